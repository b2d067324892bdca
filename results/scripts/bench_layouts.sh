#!/bin/bash
# Issue 12 item 3: every method in the padded and the packed layout, each timed against the unreduced model in
# ONE interleaved loop (python -m tokred bench bench.layouts=[padded,packed]: ABC CBA repeats, same process, same
# real CamVid test images upsampled to 1024x1024). fp32, batch 8, 2 threads. MODEL=vit_base (default) or vit_large.
#   bash results/scripts/bench_layouts.sh            # writes results/bench/layouts_<model>_1024_b8/<method>_<layout>/
# Reducer settings (documented, not tuned for quality; quality is not measured here):
#   dcts:       the policy trained by the command below (efficientnet_lite0, batch 4 on 512x512 crops of
#               CamVid train fitted into 1024x1024, i.e. the bench's object scale; 4 epochs, 368 steps), tau=0.5 at
#               every level (its validation token ratio at tau 0.5: 0.447 on 512x512 val crops).
#   early_exit: untrained exit heads (they halt on noise); p0 is the 60th percentile of the last exit head's
#               max-softmax on test image 0 (printed by results/scripts/exit_confidence.py MODEL): 0.234 for ViT-B
#               (last exit after block 7, 0-based), 0.296 for ViT-L (block 15), aiming at about 40% of the tokens
#               halting there (STEP's "up to 40% halted"; the measured share is in each metrics.json); top_k 5.
#               The policy trained for ViT-B serves ViT-L too (same input, efficientnet_lite0 for both).
#   step:       dcts + early_exit as above.  tome: r per block and cropr: r per module (ViT-B blocks 0..9, ViT-L
#               0..21), set below per model.
# Policy (once, about 10 min on 2 cores):
#   python -m tokred train-policy model=vit_base merger=dcts dataset=camvid dataset.root=../shared/data/CamVid \
#     "dataset.base_size=[1024,1024]" "dataset.crop_size=[512,512]" policy.batch_size=4 policy.epochs=4 \
#     policy.min_steps=0 train.num_workers=1 policy.out=$POLICY
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL=${MODEL:-vit_base}
REPEATS=${REPEATS:-2}
POLICY=${POLICY:-results/cache/policy/camvid_1024scale_crop512_efficientnet_lite0_L2-4-8-16.safetensors}
OUT=results/bench/layouts_${MODEL//_/-}_1024_b8
METHODS=${METHODS:-"none dcts early_exit step tome cropr"}
export OMP_WAIT_POLICY=PASSIVE
common=(model=$MODEL dataset=camvid dataset.root=../shared/data/CamVid "dataset.crop_size=[1024,1024]"
        "dataset.base_size=[1024,1024]" "bench.layouts=[padded,packed]" bench.batch_size=8 bench.repeats=$REPEATS
        bench.warmup=1 bench.threads=2 bench.flops_images=2 bench.output_dir=$OUT)
dcts=(merger=dcts merger.policy_checkpoint=$POLICY merger.target_precision=null "merger.thresholds=[0.5,0.5,0.5,0.5]")
# ViT-L: 24 blocks, so smaller r than ViT-B's 256 (Cropr prunes after 22 blocks: 22 x 256 > 4096 tokens); about the
# same GFLOPs ratio (about 2x) as ViT-B's r=256
case $MODEL in vit_large) P0=${P0:-0.296}; TOME_R=${TOME_R:-156}; CROPR_R=${CROPR_R:-172} ;;
               *) P0=${P0:-0.234}; TOME_R=${TOME_R:-256}; CROPR_R=${CROPR_R:-256} ;; esac
exits=(pruner=early_exit pruner.threshold=$P0 pruner.top_k=5 pruner.target_accuracy=null)
for m in $METHODS; do
  if compgen -G "$OUT/${m}_packed*/metrics.json" > /dev/null; then echo "skip $m (done)"; continue; fi
  case $m in
    none) args=() ;;
    dcts) args=("${dcts[@]}") ;;
    early_exit) args=("${exits[@]}") ;;
    step) args=("${dcts[@]}" "${exits[@]}") ;;
    tome) args=(merger=tome merger.r=$TOME_R) ;;
    cropr) args=(pruner=cropr pruner.r=$CROPR_R) ;;
    *) echo "unknown method $m" >&2; exit 2 ;;
  esac
  uv run --frozen python -m tokred bench "${common[@]}" "${args[@]}" bench.run_name=$m
done
uv run --frozen python results/scripts/layouts_table.py "$OUT"
