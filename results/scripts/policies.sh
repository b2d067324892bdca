#!/usr/bin/env bash
# Run from the repository root: bash results/scripts/<name>.sh
set -x
export OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=1
D="dataset=camvid dataset.root=../shared/data/CamVid"
python -m tokred train-policy merger=dcts $D policy.epochs=4
python -m tokred train-policy merger=cts $D policy.epochs=4
