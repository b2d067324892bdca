#!/bin/bash
# issue 15 "Why" bullets re-run after the change (2-core CPU)
cd "$(dirname "$0")/../.."
PY=".venv/bin/python -m tokred"
O=/tmp/demo/runs; rm -rf $O; mkdir -p $O
export TQDM_DISABLE=1
echo "== 1. SIGKILL after the first checkpoint, resume, vs uninterrupted (6 epochs, seed 3)"
$PY run experiment=smoke train.max_iters=null train.epochs=6 seed=3 eval.bench=false output_dir=$O run_name=ref > $O/ref.out 2>&1 &
REF=$!
$PY run experiment=smoke train.max_iters=null train.epochs=6 seed=3 eval.bench=false output_dir=$O run_name=cut > $O/cut.out 2>&1 &
CUT=$!
until [ -f $O/cut/last.pth ]; do sleep 0.1; done
kill -9 $CUT; wait $CUT 2>/dev/null
$PY run experiment=smoke train.max_iters=null train.epochs=6 seed=3 eval.bench=false output_dir=$O run_name=cut resume=true > $O/cut2.out 2>&1
wait $REF
.venv/bin/python - <<PYEOF
import json
a=json.load(open("$O/ref/metrics.json")); b=json.load(open("$O/cut/metrics.json"))
print("uninterrupted mIoU", a["miou"], "killed+resumed mIoU", b["miou"], "equal:", a["miou"]==b["miou"] and a["final_losses"]==b["final_losses"])
print("reducer_config keys:", list(b["reducer_config"]))
PYEOF
echo "== 2. resume=true merger=tome train.lr=0.1 on that finished/unreduced run"
$PY run experiment=smoke train.max_iters=null train.epochs=6 seed=3 eval.bench=false output_dir=$O run_name=cut resume=true merger=tome train.lr=0.1 2>&1 | grep -E "Error|error|finished" | head -3
echo "== 2b. the same on an interrupted run (no metrics.json)"
mkdir -p $O/half && cp $O/cut/config.yaml $O/cut/last.pth $O/half/
sed -i "s/run_name: cut/run_name: half/" $O/half/config.yaml
md5sum $O/half/* > $O/half.md5
$PY run experiment=smoke train.max_iters=null train.epochs=6 seed=3 eval.bench=false output_dir=$O run_name=half resume=true merger=tome train.lr=0.1 2>&1 | grep -A4 "differs" | head -8
md5sum -c --quiet $O/half.md5 && echo "half/: every file unchanged, nothing added: $(ls $O/half | tr '\n' ' ')"
echo "== 3. SIGINT during training"
$PY run experiment=smoke train.max_iters=null train.epochs=6 seed=3 eval.bench=false output_dir=$O run_name=int > $O/int.out 2> $O/int.err &
P=$!
until [ -f $O/int/last.pth ]; do sleep 0.1; done
kill -INT $P; wait $P; echo "exit code $?"
tail -3 $O/int.err
grep "stopped by" $O/int/run.log | cut -c1-200
cd "$(dirname "$0")/../.."
PY=".venv/bin/python -m tokred"
O=/tmp/demo/runs
echo "== 2c. refusal through the CLI now"
$PY run experiment=smoke train.max_iters=null train.epochs=6 seed=3 eval.bench=false output_dir=$O run_name=half resume=true merger=tome train.lr=0.1 2>&1 | tail -8; echo "exit ${PIPESTATUS[0]}"
echo "== 4. CamVid-layout copy of the sample: empty test.txt, truncated test image, invalid test label"
R=/tmp/demo/camvid; rm -rf $R; mkdir -p $R
S=tokred/data/camvid_sample
.venv/bin/python - <<PYEOF
import shutil, pathlib, numpy as np
from PIL import Image
S=pathlib.Path("$S"); R=pathlib.Path("$R")
for p in S.rglob("*"):
    if p.is_file():
        q=R/p.relative_to(S); q.parent.mkdir(parents=True, exist_ok=True); shutil.copy(p,q)
print(sorted(x.name for x in R.iterdir()))
PYEOF
head -3 $R/train.txt
cd "$(dirname "$0")/../.."
PY=".venv/bin/python -m tokred"
O=/tmp/demo/runs4; rm -rf $O
R=/tmp/demo/camvid
: > $R/test.txt
echo "-- empty test.txt"
$PY run experiment=smoke dataset=camvid dataset.root=$R eval.split=test output_dir=$O run_name=t 2>&1 | tail -3; echo "exit ${PIPESTATUS[0]}; run folder exists: $(test -d $O/t && echo yes || echo no)"
sed 's/val/test/g' $R/val.txt > $R/test.txt; cp -r $R/val $R/test; cp -r $R/valannot $R/testannot
for f in $R/test/*; do mv $f ${f}; done
IMG=$(ls $R/test | head -1); LBL=$(ls $R/testannot | sed -n 2p)
head -c 3000 $R/test/$IMG > /tmp/demo/t && mv /tmp/demo/t $R/test/$IMG
.venv/bin/python -c "
import numpy as np; from PIL import Image
p='$R/testannot/$LBL'; a=np.array(Image.open(p)); a[0,:10]=40; Image.fromarray(a).save(p)"
echo "-- truncated test image and invalid test label"
$PY run experiment=smoke dataset=camvid dataset.root=$R eval.split=test output_dir=$O run_name=t 2>&1 | tail -4; echo "exit ${PIPESTATUS[0]}; run folder exists: $(test -d $O/t && echo yes || echo no)"
