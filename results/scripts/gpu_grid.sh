#!/usr/bin/env bash
# One prepared GPU check (issue 13 item 4): the ViT-S 768x1024 CamVid protocol's baseline and key cells trained in
# bf16 (train.amp: bf16 autocast on CUDA), then batch-32 bf16 throughput of none / tome / dcts / step, and the
# tables with the GPU named. Every stage is time-boxed (`timeout`) under one overall budget, so what finished is
# always written, packed and sent back.
#
#   bash results/scripts/gpu_grid.sh [--dry-run]
#
# --dry-run: the same stages and command lines on CPU with tiny settings (test_vit on the embedded CamVid sample,
#   256x256 crop, one iteration per run, bench batch 2, one repeat) into a temp folder: proves every command line
#   parses and runs end to end before any GPU time is spent (`nox -s gpu_dry_run` runs it through
#   tests/test_gpu_script.py, which the default test run skips: about 2 minutes).
#
# Before the GPU call, here (needs the network):
#   bash results/scripts/gpu_wheels.sh    # results/gpu_wheels/ (hydra-core, omegaconf, fvcore, ... as wheels) and
#                                         # results/gpu_data/CamVid/ (CamVid, images as JPEG, ~30 MB: the 182 MB
#                                         # PNG set does not fit the 64 MiB that travels; ../shared never travels)
#   du -sh results/gpu_wheels results/gpu_data   # the whole tree that travels must stay under 64 MiB
# Then ONE device `run` call (machine start ~2-3 min + this script <= BUDGET_S + transfers, of 15 min in all):
#   run(command="DATA_ROOT=results/gpu_data/CamVid BUDGET_S=540 bash results/scripts/gpu_grid.sh",
#       carry=["results/gpu_wheels", "results/gpu_data"], timeout_s=590)
# What comes back ($OUT, at most 8 files): gpu_grid.log, stages.tsv, env.txt, summary.md, summary.csv, bench.md,
# bench.csv, results.tar.gz (the whole results folder without checkpoints). Call give_back afterwards.
#
# Environment variables (defaults in brackets):
#   DATA_ROOT     CamVid root [../shared/data/CamVid]; refused with a clear message when it has no train.txt
#   PYTHON        interpreter [python3]
#   WHEEL_DIR     wheels installed with pip --no-index --no-deps --target before anything runs [results/gpu_wheels]
#   RESULTS_DIR   where the runs go [$TMPDIR/tokred-gpu-grid-<date> when $OUT is set, else results/gpu/<date>]
#   OUT           when set, the files above are copied there at the end (the device tool sets it)
#   BUDGET_S      overall wall budget of the script in seconds [540; dry run 900]
#   GRID          grid name [camvid_gpu_quick]
#   CELLS         cells to train, in order ["none dcts_t50 step_t50_p90 early_exit_p90 tome_r64"]; the first one
#                 also trains the baseline
#   BENCH_METHODS throughput rows, from none tome dcts step ["none tome dcts step"]
#   BASELINE_EPOCHS / FINETUNE_EPOCHS  [the grid's: 8 / 1]
#   T_BASELINE T_POLICY_CELL T_CELL T_BENCH T_SUMMARY  per-stage time boxes in seconds [240 100 70 40 60]
#   BENCH_BATCH [32]  BENCH_REPEATS [10]  BENCH_WARMUP [3]  BENCH_FLOPS_IMAGES [2]
#   WORKERS       train.num_workers [8, or 0 when /dev/shm has under 4 GiB free]
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2

usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
DRY_RUN=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_grid.sh: unknown argument $arg (only --dry-run)" >&2; exit 2 ;;
  esac
done

STAMP=$(date -u +%Y%m%d_%H%M%S)
PY=${PYTHON:-python3}
WHEEL_DIR=${WHEEL_DIR:-results/gpu_wheels}
DATA_ROOT=${DATA_ROOT:-../shared/data/CamVid}
GRID=${GRID:-camvid_gpu_quick}
CELLS=${CELLS:-none dcts_t50 step_t50_p90 early_exit_p90 tome_r64}
BENCH_METHODS=${BENCH_METHODS:-none tome dcts step}
T_BASELINE=${T_BASELINE:-240}
T_POLICY_CELL=${T_POLICY_CELL:-100}
T_CELL=${T_CELL:-70}
T_BENCH=${T_BENCH:-40}
T_SUMMARY=${T_SUMMARY:-60}
PACK_RESERVE=20
if [ "$DRY_RUN" = 1 ]; then
  RESULTS_DIR=${RESULTS_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/tokred-gpu-dry-XXXXXX")}
  BUDGET_S=${BUDGET_S:-900}
  T_BASELINE=300 T_POLICY_CELL=300 T_CELL=300 T_BENCH=300 T_SUMMARY=300
elif [ -n "${OUT:-}" ]; then
  RESULTS_DIR=${RESULTS_DIR:-${TMPDIR:-/tmp}/tokred-gpu-grid-$STAMP}
  BUDGET_S=${BUDGET_S:-540}
else
  RESULTS_DIR=${RESULTS_DIR:-results/gpu/$STAMP}
  BUDGET_S=${BUDGET_S:-540}
fi
mkdir -p "$RESULTS_DIR/logs" || exit 2
RESULTS_DIR=$(cd "$RESULTS_DIR" && pwd)
LOG=$RESULTS_DIR/gpu_grid.log
STAGES=$RESULTS_DIR/stages.tsv
exec > >(tee -a "$LOG") 2>&1
printf 'stage\trc\tseconds\tnote\n' > "$STAGES"
T0=$SECONDS
export PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE
[ "$DRY_RUN" = 1 ] && export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
echo "gpu_grid.sh: $( [ "$DRY_RUN" = 1 ] && echo DRY RUN || echo GPU run ) at $STAMP; results in $RESULTS_DIR; budget ${BUDGET_S}s"

remaining() { echo $(( BUDGET_S - (SECONDS - T0) )); }

# stage NAME BOX RESERVE CMD...: runs CMD under timeout min(BOX, remaining - RESERVE), logs to logs/NAME.log
stage() {
  local name=$1 box=$2 reserve=$3; shift 3
  local left=$(( $(remaining) - reserve )) t rc start
  t=$(( box < left ? box : left ))
  if [ "$t" -lt 10 ]; then
    echo "=== $name: skipped, ${left}s left of the budget"
    printf '%s\t-\t0\tskipped: no time left\n' "$name" >> "$STAGES"
    return 124
  fi
  echo "=== $name (time box ${t}s): $*"
  start=$SECONDS
  timeout --kill-after=10 "$t" "$@" > "$RESULTS_DIR/logs/$name.log" 2>&1
  rc=$?
  tail -n 15 "$RESULTS_DIR/logs/$name.log"
  local note=ok
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && note="timed out after ${t}s"
  [ "$rc" != 0 ] && [ "$note" = ok ] && note="failed"
  echo "=== $name: rc $rc ($note) in $(( SECONDS - start ))s; $(remaining)s of the budget left"
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( SECONDS - start ))" "$note" >> "$STAGES"
  return "$rc"
}

# ------------------------------------------------------------------ environment: carried wheels, tokred itself
SITE=$RESULTS_DIR/site
if compgen -G "$WHEEL_DIR/*.whl" > /dev/null; then
  PIP=("$PY" -m pip)
  "$PY" -m pip --version > /dev/null 2>&1 || PIP=(python3 -m pip)  # (uv venvs have no pip; wheels are pure)
  stage install_wheels 120 0 "${PIP[@]}" install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$WHEEL_DIR"/*.whl || { echo "gpu_grid.sh: installing $WHEEL_DIR failed"; }
  export PYTHONPATH=$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  echo "gpu_grid.sh: no wheels in $WHEEL_DIR (bash results/scripts/gpu_wheels.sh builds them); using $PY as it is"
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
if ! "$PY" - <<'PY'
import importlib, sys
need = ["torch", "torchvision", "timm", "numpy", "scipy", "pandas", "matplotlib", "PIL", "safetensors", "tqdm",
        "hydra", "omegaconf", "fvcore", "iopath", "yacs", "termcolor", "tabulate", "portalocker", "yaml", "tokred"]
missing = []
for name in need:
    try:
        importlib.import_module(name)
    except Exception as err:  # noqa: BLE001 - report every missing piece at once
        missing.append(f"{name} ({type(err).__name__}: {err})")
if missing:
    sys.exit("gpu_grid.sh: missing Python packages: " + "; ".join(missing)
             + "\n  build the wheels with bash results/scripts/gpu_wheels.sh and carry results/gpu_wheels")
import tokred, torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, cuda available {torch.cuda.is_available()}"
      + (f" ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "") + f", tokred from {tokred.__file__}")
PY
then
  exit 3
fi
{
  echo "date_utc: $STAMP"; echo "dry_run: $DRY_RUN"; echo "host: $(uname -a)"
  "$PY" -c "import sys, torch; print('python:', sys.version.split()[0]); print('torch:', torch.__version__, 'cuda', torch.version.cuda); print('gpu:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"
  command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  echo "nproc: $(nproc)"; df -h /dev/shm 2>/dev/null | tail -1 | sed 's/^/shm: /'
} > "$RESULTS_DIR/env.txt" 2>&1

# ------------------------------------------------------------------ settings of the two modes
ABL=$RESULTS_DIR/ablations
if [ "$DRY_RUN" = 1 ]; then
  # the grid's cells as they are; its protocol overrides replaced by tiny CPU ones
  GRID_ARGS=("grid.overrides=['dataset=camvid_sample','model=test_vit','dataset.crop_size=[256,256]','dataset.base_size=[256,256]','train.batch_size=2','train.max_iters=1','train.warmup_iters=1','eval.max_items=2','eval.flops_images=1','eval.bench_repeats=1','eval.bench_batch_size=1','policy.epochs=1','policy.max_steps=1','policy.min_steps=1','policy.batch_size=2']"
             "grid.execution=['device=cpu','train.num_workers=0']")
  RUN_EXTRA=()
  BENCH_COMMON=(dataset=camvid_sample model=test_vit "dataset.crop_size=[256,256]" "dataset.base_size=[256,256]"
                device=cpu bench.threads=1)
  BENCH_BATCH=${BENCH_BATCH:-2} BENCH_REPEATS=${BENCH_REPEATS:-1} BENCH_WARMUP=${BENCH_WARMUP:-1}
  BENCH_FLOPS_IMAGES=${BENCH_FLOPS_IMAGES:-1}
else
  if [ ! -f "$DATA_ROOT/train.txt" ] || [ ! -f "$DATA_ROOT/test.txt" ]; then
    echo "gpu_grid.sh: no CamVid at DATA_ROOT=$DATA_ROOT (from $PWD): expected train.txt/val.txt/test.txt and the" \
         "image folders there. ../shared does not travel to the device machine: build results/gpu_data/CamVid" \
         "with bash results/scripts/gpu_wheels.sh, carry results/gpu_data and pass DATA_ROOT=results/gpu_data/CamVid"
    printf 'data\t2\t0\tno CamVid at %s\n' "$DATA_ROOT" >> "$STAGES"
    exit 2
  fi
  DATA_ROOT=$(cd "$DATA_ROOT" && pwd)
  GRID_ARGS=()
  # DataLoader workers pass batches through /dev/shm (a 768x1024 batch of 8 is ~75 MB): without room there they die
  # with a bus error, so fall back to loading in the main process
  SHM_MB=$(df -Pm /dev/shm 2>/dev/null | awk 'NR == 2 {print $4}')
  if [ -z "${WORKERS:-}" ]; then
    WORKERS=8
    if [ -z "$SHM_MB" ] || [ "$SHM_MB" -lt 4096 ]; then
      WORKERS=0; echo "gpu_grid.sh: /dev/shm has ${SHM_MB:-?} MB free; train.num_workers=0"
    fi
  fi
  RUN_EXTRA=("dataset.root=$DATA_ROOT" "train.num_workers=$WORKERS")
  BENCH_COMMON=(dataset=camvid "dataset.root=$DATA_ROOT" model=vit_small "dataset.crop_size=[768,1024]"
                "dataset.base_size=[768,1024]" device=auto)
  BENCH_BATCH=${BENCH_BATCH:-32} BENCH_REPEATS=${BENCH_REPEATS:-10} BENCH_WARMUP=${BENCH_WARMUP:-3}
  BENCH_FLOPS_IMAGES=${BENCH_FLOPS_IMAGES:-2}
fi
[ -n "${BASELINE_EPOCHS:-}" ] && GRID_ARGS+=("grid.baseline_epochs=$BASELINE_EPOCHS")
[ -n "${FINETUNE_EPOCHS:-}" ] && GRID_ARGS+=("grid.finetune_epochs=$FINETUNE_EPOCHS")
read -r -a CELL_LIST <<< "$CELLS"
read -r -a BENCH_LIST <<< "$BENCH_METHODS"
# the cells the grid file defines (the ones not trained in a stage are deleted with ~grid.cells.<name>)
# (the reference cell, normally none, stays in every invocation: the grid requires it; once finished it is skipped)
GRID_CELLS=$("$PY" -c "
import sys
from tokred.ablations import load_grid
g = load_grid(sys.argv[1])
print(g.reference, ' '.join(c.name for c in g.cells))" "$GRID") || { echo "gpu_grid.sh: grid $GRID unreadable"; exit 2; }
read -r -a GRID_CELL_LIST <<< "$GRID_CELLS"
REF=${GRID_CELL_LIST[0]}; GRID_CELL_LIST=("${GRID_CELL_LIST[@]:1}"); GRID_CELLS=" ${GRID_CELL_LIST[*]} "
for c in "${CELL_LIST[@]}"; do
  [[ "$GRID_CELLS" == *" $c "* ]] || { echo "gpu_grid.sh: cell $c is not in grid $GRID ($GRID_CELLS)"; exit 2; }
done
BENCH_RESERVE=$(( ${#BENCH_LIST[@]} * (T_BENCH < 30 ? T_BENCH : 30) + PACK_RESERVE + 20 ))

# ------------------------------------------------------------------ training: one ablate invocation per cell
first=1
for cell in "${CELL_LIST[@]}"; do
  drop=()
  for c in "${GRID_CELL_LIST[@]}"; do [ "$c" = "$cell" ] || [ "$c" = "$REF" ] || drop+=("~grid.cells.$c"); done
  box=$T_CELL name=cell_$cell
  [[ "$cell" == dcts* || "$cell" == step* || "$cell" == cts* ]] && box=$T_POLICY_CELL  # may train the policy first
  if [ "$first" = 1 ]; then box=$(( T_BASELINE + box )); name=baseline_and_$cell; first=0; fi
  stage "$name" "$box" "$BENCH_RESERVE" "$PY" -m tokred ablate "grid=$GRID" "grid.root=$ABL" "${GRID_ARGS[@]}" \
    "${drop[@]}" "${RUN_EXTRA[@]}"
  if [ "$name" != "cell_$cell" ] && [ ! -f "$(ls -d "$ABL"/*/runs/baseline_seed0 2>/dev/null | head -1)/metrics.json" ]; then
    echo "gpu_grid.sh: the baseline did not finish; no cell can be fine-tuned, going on to the benchmarks"
    break
  fi
done
PROTO=$(ls -d "$ABL"/*/ 2>/dev/null | head -1); PROTO=${PROTO%/}

stage summary "$T_SUMMARY" "$PACK_RESERVE" "$PY" - "$PROTO" <<'PY'
import sys
from pathlib import Path
from tokred.ablations import summarize, write_summary
proto = Path(sys.argv[1]) if sys.argv[1] else None
if proto is None or not proto.is_dir():
    sys.exit("no protocol folder: no cell ran")
table = write_summary(summarize(proto), proto)
print((proto / "summary.md").read_text())
PY

# ------------------------------------------------------------------ throughput: batch 32, bf16, vs the unreduced model
ckpt() { local f="$PROTO/runs/$1_seed0/last.pth"; [ -n "$PROTO" ] && [ -f "$f" ] && echo "checkpoint=$f"; }
POLICY=$(ls "$PROTO"/policy/*.safetensors 2>/dev/null | head -1)
DCTS=(merger=dcts "merger.thresholds=[0.5,0.5,0.5,0.5]" merger.target_precision=null)
[ -n "$POLICY" ] && DCTS+=("merger.policy_checkpoint=$POLICY")
EE=(pruner=early_exit pruner.threshold=0.9 pruner.target_accuracy=null)
for m in "${BENCH_LIST[@]}"; do
  case "$m" in
    none) args=($(ckpt none)) ;;
    tome) args=(merger=tome merger.r=64 $(ckpt tome_r64)) ;;
    dcts) args=("${DCTS[@]}" $(ckpt dcts_t50)) ;;
    step) args=("${DCTS[@]}" "${EE[@]}" $(ckpt step_t50_p90)) ;;
    *) echo "gpu_grid.sh: unknown bench method $m (none tome dcts step)"; continue ;;
  esac
  printf '%s\t%s\n' "$m" "${args[*]}" >> "$RESULTS_DIR/bench_args.tsv"
  stage "bench_$m" "$T_BENCH" "$PACK_RESERVE" "$PY" -m tokred bench "${BENCH_COMMON[@]}" "${args[@]}" \
    bench.reference=none bench.inputs=real "bench.batch_size=$BENCH_BATCH" bench.precision=bf16 \
    "bench.warmup=$BENCH_WARMUP" "bench.repeats=$BENCH_REPEATS" "bench.flops_images=$BENCH_FLOPS_IMAGES" \
    "bench.output_dir=$RESULTS_DIR/bench" "bench.run_name=$m"
done

timeout 60 "$PY" - "$RESULTS_DIR" <<'PY'
"""bench.md / bench.csv: one row per bench run, with the device that measured it."""
import csv, json, sys
from pathlib import Path
root = Path(sys.argv[1])
weights = {}
for line in (root / "bench_args.tsv").read_text().splitlines() if (root / "bench_args.tsv").is_file() else []:
    name, _, args = line.partition("\t")
    ck = [a.split("=", 1)[1] for a in args.split() if a.startswith("checkpoint=")]
    weights[name] = Path(ck[0]).parent.name if ck else "random init"
rows = []
for f in sorted((root / "bench").glob("*/metrics.json")):
    m = json.loads(f.read_text())
    t = m.get("throughput_detail") or {}
    red, base = t.get("reduced") or {}, t.get("baseline") or {}
    g = m.get("gflops_detail") or {}
    fmt = lambda v, p=2: "" if v is None else (f"{v:.{p}f}" if isinstance(v, float) else str(v))
    rows.append({"method": f.parent.name, "device": red.get("device_name") or m.get("device"),
                 "precision": red.get("precision", m.get("precision")), "batch": red.get("batch_size", m.get("batch_size")),
                 "images_per_second": fmt(red.get("images_per_second", m.get("images_per_second")), 1),
                 "unreduced_images_per_second": fmt(base.get("images_per_second"), 1),
                 "speedup": fmt(m.get("speedup")), "gflops": fmt(m.get("gflops"), 1),
                 "unreduced_gflops": fmt(g.get("baseline_gflops"), 1),
                 "peak_memory_mib": fmt(red.get("peak_memory_mib", m.get("peak_memory_mib")), 0),
                 "weights": weights.get(f.parent.name, "?")})
if not rows:
    sys.exit("no bench results")
with open(root / "bench.csv", "w", newline="") as fh:
    w = csv.DictWriter(fh, fieldnames=list(rows[0]))
    w.writeheader(); w.writerows(rows)
cols = list(rows[0])
md = [f"# Throughput on {rows[0]['device']} (bench, vs the unreduced model in the same process)", "",
      "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
md += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
(root / "bench.md").write_text("\n".join(md) + "\n")
print("\n".join(md))
PY

# ------------------------------------------------------------------ pack what finished
if [ -n "$PROTO" ]; then
  for f in summary.md summary.csv; do [ -f "$PROTO/$f" ] && cp "$PROTO/$f" "$RESULTS_DIR/$f"; done
fi
echo "gpu_grid.sh: done in $(( SECONDS - T0 ))s"; cat "$STAGES"
tar -czf "$RESULTS_DIR.tar.gz" --exclude='*.pth' --exclude='*.safetensors' --exclude='./site' \
  -C "$RESULTS_DIR" . 2>/dev/null && mv "$RESULTS_DIR.tar.gz" "$RESULTS_DIR/results.tar.gz"
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  for f in gpu_grid.log stages.tsv env.txt summary.md summary.csv bench.md bench.csv results.tar.gz; do
    [ -f "$RESULTS_DIR/$f" ] && cp "$RESULTS_DIR/$f" "$OUT/$f"
  done
  echo "gpu_grid.sh: copied to $OUT: $(ls "$OUT" | tr '\n' ' ')"
fi
echo "gpu_grid.sh: results in $RESULTS_DIR"
# exit status: 0 when the baseline, every cell and every bench finished
! awk -F'\t' 'NR > 1 && $2 != "0" {bad=1} END {exit !bad}' "$STAGES"
