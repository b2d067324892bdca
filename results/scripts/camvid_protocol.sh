#!/usr/bin/env bash
# Run from the repository root: bash results/scripts/<name>.sh
# CamVid protocol (ViT-T, 384x512, train on train, report on test), run from the repo root.
set -x
export OMP_WAIT_POLICY=PASSIVE TQDM_MININTERVAL=30
R="dataset=camvid dataset.root=../shared/data/CamVid eval.bench_repeats=10 eval.bench_batch_size=4"
python -m tokred run $R train.epochs=10 run_name=base_none_vit-tiny_10ep
