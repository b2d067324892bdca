#!/bin/bash
# Issue 12: the packed layout against the padded one, same model, same process, ABBA repeats
# (python -m tokred bench bench.reference=padded). ViT-B/16 at 1024x1024, batch 8, fp32, 2 threads, real CamVid
# test images upsampled. Untrained reducers, documented: dCTS with a randomly initialised policy (tau 0.5, no
# calibration) gives each image its own token count; the early exit's untrained heads halt with p0 = 0.05
# (below 1/K), top_k 5. Both only make the counts differ; quality is not measured here.
set -euo pipefail
cd "$(dirname "$0")/../.."
common=(model=vit_base dataset=camvid dataset.root=../shared/data/CamVid "dataset.crop_size=[1024,1024]"
        "dataset.base_size=[1024,1024]" bench.reference=padded bench.batch_size=8 bench.repeats=3 bench.warmup=1
        bench.threads=2 bench.flops_images=2 bench.output_dir=results/bench/packed_vs_padded)
dcts=(merger=dcts merger.target_precision=null "merger.thresholds=[0.5,0.5,0.5,0.5]")
exits=(pruner=early_exit pruner.threshold=0.05 pruner.top_k=5 pruner.target_accuracy=null)
uv run --frozen python -m tokred bench "${common[@]}" "${dcts[@]}" bench.run_name=dcts_vit-base_1024_b8
uv run --frozen python -m tokred bench "${common[@]}" "${exits[@]}" bench.run_name=early-exit_vit-base_1024_b8
uv run --frozen python -m tokred bench "${common[@]}" "${dcts[@]}" "${exits[@]}" bench.run_name=step_vit-base_1024_b8
