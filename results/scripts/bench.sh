#!/usr/bin/env bash
# Run from the repository root: bash results/scripts/<name>.sh
# CPU benchmarks (one thread, so that the training grid keeps the other core). Run from the repo root.
set -x
export OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE
C="dataset=camvid dataset.root=../shared/data/CamVid bench.threads=1 bench.inputs=real"
B512="model=vit_base dataset.crop_size=[512,512] bench.batch_size=4"
L1024="model=vit_large dataset.crop_size=[1024,1024] bench.batch_size=1 bench.warmup=1 bench.repeats=3 bench.flops_images=1"
P=results/cache/policy/camvid_384x512_efficientnet_lite0_L2-4-8-16.safetensors
# issue 3: overhead of tokred's block loop vs timm's forward_features (ViT-B/16 512x512, batch 4)
python -m tokred bench $C $B512 bench.reference=timm bench.warmup=2 bench.repeats=10 bench.flops_images=1
# issue 4: ToMe at the r that halves the encoder GFLOPs, vs none
python -m tokred bench $C $B512 merger=tome merger.r=88 bench.warmup=2 bench.repeats=8 bench.flops_images=2
# issue 3: ViT-L/16 1024x1024: fvcore GFLOPs next to the analytic count, CPU latency at batch 1
python -m tokred bench $C $L1024 bench.reference=timm
# issue 4 / 7 / 5 at ViT-L/16 1024x1024 vs none
python -m tokred bench $C $L1024 merger=tome merger.r=156
python -m tokred bench $C $L1024 pruner=cropr pruner.r=172
python -m tokred bench $C $L1024 merger=dcts merger.policy_checkpoint=$P bench.flops_images=4
