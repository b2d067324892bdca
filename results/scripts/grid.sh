#!/usr/bin/env bash
# Runs the CamVid ablation grid, reusing the baseline trained by camvid_protocol.sh and the two policies.
set -ex
cd "$(dirname "$0")/../.."
export OMP_WAIT_POLICY=PASSIVE
PROTO=results/ablations/camvid_vit-tiny_384x512
python - <<'PY'
from dataclasses import replace
from tokred.ablations import load_grid, _protocol_identity, _write_json
g = replace(load_grid("camvid_cpu"), finetune_epochs=1)
_write_json(g.protocol_dir / "protocol.json", {"identity": _protocol_identity(g, []), "cells": {},
            "note": "baseline_seed0 copied from results/runs/base_none_vit-tiny_10ep (same protocol, trained by "
                    "python -m tokred run dataset=camvid dataset.root=../shared/data/CamVid eval.bench_repeats=10 "
                    "eval.bench_batch_size=4 train.epochs=10 run_name=base_none_vit-tiny_10ep)"})
PY
mkdir -p $PROTO/runs $PROTO/policy
cp -r results/runs/base_none_vit-tiny_10ep $PROTO/runs/baseline_seed0
for L in L2-4-8-16 L2; do
  for ext in safetensors json; do
    cp results/cache/policy/camvid_384x512_efficientnet_lite0_$L.$ext $PROTO/policy/efficientnet_lite0_384x512_$L.$ext
  done
done
python -m tokred ablate grid=camvid_cpu grid.finetune_epochs=1
