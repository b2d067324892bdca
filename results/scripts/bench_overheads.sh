#!/bin/bash
# Issue 12 item 4: the reducers' components (dCTS policy CNN and supertoken embedding, exit heads and their
# selection, Cropr scorer, top-k, ToMe matching, token gather/scatter) as % of the unreduced forward, timed in the
# same process on the same batch (python -m tokred bench bench.overheads=only; tokred.measure.overheads).
#   MODEL=vit_large BATCH=1 bash results/scripts/bench_overheads.sh
# Same reducer settings as bench_layouts.sh. Writes results/bench/overheads_<model>_1024_b<batch>/<method>/.
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL=${MODEL:-vit_large}
BATCH=${BATCH:-1}
REPEATS=${REPEATS:-2}
POLICY=${POLICY:-results/cache/policy/camvid_1024scale_crop512_efficientnet_lite0_L2-4-8-16.safetensors}
OUT=results/bench/overheads_${MODEL//_/-}_1024_b$BATCH
export OMP_WAIT_POLICY=PASSIVE
# ViT-L: 24 blocks, so smaller r than ViT-B's 256 (Cropr prunes after 22 blocks: 22 x 256 > 4096 tokens); about the
# same GFLOPs ratio (about 2x) as ViT-B's r=256
case $MODEL in vit_large) P0=${P0:-0.296}; TOME_R=${TOME_R:-156}; CROPR_R=${CROPR_R:-172} ;;
               *) P0=${P0:-0.234}; TOME_R=${TOME_R:-256}; CROPR_R=${CROPR_R:-256} ;; esac
common=(model=$MODEL dataset=camvid dataset.root=../shared/data/CamVid "dataset.crop_size=[1024,1024]"
        "dataset.base_size=[1024,1024]" bench.overheads=only bench.batch_size=$BATCH bench.repeats=$REPEATS
        bench.warmup=1 bench.threads=2 bench.flops_images=0 bench.output_dir=$OUT)
step=(merger=dcts merger.policy_checkpoint=$POLICY merger.target_precision=null "merger.thresholds=[0.5,0.5,0.5,0.5]"
      pruner=early_exit pruner.threshold=$P0 pruner.top_k=5 pruner.target_accuracy=null)
for m in ${METHODS:-step tome cropr}; do
  if [ -e "$OUT/$m/metrics.json" ]; then echo "skip $m (done)"; continue; fi
  case $m in
    step) args=("${step[@]}") ;;
    tome) args=(merger=tome merger.r=$TOME_R) ;;
    cropr) args=(pruner=cropr pruner.r=$CROPR_R) ;;
    *) echo "unknown method $m" >&2; exit 2 ;;
  esac
  uv run --frozen python -m tokred bench "${common[@]}" "${args[@]}" bench.run_name=$m
done
