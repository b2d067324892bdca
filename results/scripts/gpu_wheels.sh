#!/usr/bin/env bash
# Builds, here (network needed), what results/scripts/gpu_grid.sh carries to the GPU machine, where nothing can be
# downloaded and ../shared does not travel:
#   results/gpu_wheels/       pure-Python wheels (py3-none-any) of what the H200 image lacks: hydra-core, omegaconf,
#                             antlr4-python3-runtime, fvcore, iopath, yacs, termcolor (+ tabulate, portalocker, small,
#                             in case), at the versions of uv.lock; sdist-only ones (antlr4, fvcore, iopath) are built
#                             into wheels with `pip wheel` (python 3.12 there, any python 3 here: they are pure)
#   results/gpu_data/CamVid/  CamVid train/val/test with the images re-encoded as JPEG (quality $JPEG_QUALITY, ~30 MB
#                             at 90) and the label PNGs as they are, so that the tree that travels stays under 64 MiB
#                             (the PNG set is 182 MB); {train,val,test}.txt rewritten to the new names
#   bash results/scripts/gpu_wheels.sh [--no-data]
# Both folders should be git-ignored (then named in the run call's carry). Environment: PIP [python3 -m pip],
# PYTHON (for the JPEG conversion, needs Pillow) [.venv/bin/python or python3], WHEEL_DIR [results/gpu_wheels],
# SRC_DATA [../shared/data/CamVid], DATA_OUT [results/gpu_data/CamVid], JPEG_QUALITY [90].
set -euo pipefail
cd "$(dirname "$0")/../.."
WHEEL_DIR=${WHEEL_DIR:-results/gpu_wheels}
read -r -a PIP <<< "${PIP:-python3 -m pip}"
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
SRC_DATA=${SRC_DATA:-../shared/data/CamVid}
DATA_OUT=${DATA_OUT:-results/gpu_data/CamVid}
JPEG_QUALITY=${JPEG_QUALITY:-90}
DATA=1
for arg in "$@"; do
  case "$arg" in
    --no-data) DATA=0 ;;
    *) echo "gpu_wheels.sh: unknown argument $arg (only --no-data)" >&2; exit 2 ;;
  esac
done

# ---------------------------------------------------------------- wheels, pinned to uv.lock
NAMES=(hydra-core omegaconf antlr4-python3-runtime fvcore iopath yacs termcolor tabulate portalocker)
mapfile -t SPECS < <(python3 - "${NAMES[@]}" <<'PY'
import sys, tomllib
lock = tomllib.load(open("uv.lock", "rb"))
versions = {p["name"]: p["version"] for p in lock["package"]}
for name in sys.argv[1:]:
    if name not in versions:
        sys.exit(f"gpu_wheels.sh: {name} not in uv.lock")
    print(f"{name}=={versions[name]}")
PY
)
echo "gpu_wheels.sh: ${SPECS[*]}"
rm -rf "$WHEEL_DIR"; mkdir -p "$WHEEL_DIR"
"${PIP[@]}" wheel -q --no-deps --wheel-dir "$WHEEL_DIR" "${SPECS[@]}"
bad=$(ls "$WHEEL_DIR" | grep -v -- '-none-any\.whl$' || true)
[ -z "$bad" ] || { echo "gpu_wheels.sh: not pure-Python wheels (would not install on the GPU machine): $bad" >&2; exit 1; }
[ "$(ls "$WHEEL_DIR"/*.whl | wc -l)" = "${#NAMES[@]}" ] || { echo "gpu_wheels.sh: expected ${#NAMES[@]} wheels" >&2; exit 1; }
ls -l "$WHEEL_DIR"

# ---------------------------------------------------------------- CamVid as JPEG
if [ "$DATA" = 1 ]; then
  [ -f "$SRC_DATA/train.txt" ] || { echo "gpu_wheels.sh: no CamVid at SRC_DATA=$SRC_DATA" >&2; exit 1; }
  "$PY" - "$SRC_DATA" "$DATA_OUT" "$JPEG_QUALITY" <<'PY'
import shutil, sys
from pathlib import Path
from PIL import Image
src, out, quality = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
prefix = "/SegNet/CamVid/"
for split in ("train", "val", "test"):
    lines = []
    for line in (src / f"{split}.txt").read_text().split("\n"):
        if not line.strip():
            continue
        img, lab = (p[len(prefix):] if p.startswith(prefix) else p for p in line.split())
        jpg = str(Path(img).with_suffix(".jpg"))
        if not (out / jpg).is_file():
            (out / jpg).parent.mkdir(parents=True, exist_ok=True)
            Image.open(src / img).convert("RGB").save(out / jpg, "JPEG", quality=quality)
        (out / lab).parent.mkdir(parents=True, exist_ok=True)
        if not (out / lab).is_file():
            shutil.copyfile(src / lab, out / lab)
        lines.append(f"{jpg} {lab}")
    (out / f"{split}.txt").write_text("\n".join(lines) + "\n")
    print(f"{split}: {len(lines)} pairs")
PY
  du -sh "$DATA_OUT"
fi
du -sh "$WHEEL_DIR"
