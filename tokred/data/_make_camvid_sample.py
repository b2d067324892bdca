"""Rebuilds the embedded ``camvid_sample`` from a full SegNet CamVid folder.

Usage: ``python -m tokred.data._make_camvid_sample <full CamVid root> [<output dir>]``.

Selection rule: every 23rd line of ``train.txt`` and every 17th line of ``val.txt`` (starting
with the first), which spreads the picks over all sequences. Labels are copied byte for byte;
RGB images are re-encoded as lossless WebP (pixel-identical, checked) to keep the sample small.
"""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

_PREFIX = "/SegNet/CamVid/"
_STRIDES = {"train": 23, "val": 17}


def _make_sample(src: Path, dst: Path) -> None:
    """Copies the selected CamVid pairs from ``src`` into ``dst`` (SegNet layout).

    Args:
        src: Full SegNet CamVid folder (with train.txt, val.txt, ...).
        dst: Output folder; its split folders and list files are overwritten.

    Raises:
        FileNotFoundError: If a list file or listed file is missing in ``src``.
        RuntimeError: If a re-encoded image does not decode to the same pixels.
    """
    for split, stride in _STRIDES.items():
        lines = (src / f"{split}.txt").read_text().split("\n")
        picked = [ln.split() for ln in lines if ln.strip()][::stride]
        (dst / split).mkdir(parents=True, exist_ok=True)
        (dst / f"{split}annot").mkdir(parents=True, exist_ok=True)
        out_lines = []
        for image_entry, label_entry in picked:
            image_rel = image_entry.removeprefix(_PREFIX)
            label_rel = label_entry.removeprefix(_PREFIX)
            image_out = (dst / image_rel).with_suffix(".webp")
            with Image.open(src / image_rel) as img:
                pixels = np.asarray(img.convert("RGB"))
            Image.fromarray(pixels).save(image_out, "WEBP", lossless=True, quality=100, method=6)
            with Image.open(image_out) as check:
                if not np.array_equal(np.asarray(check.convert("RGB")), pixels):
                    raise RuntimeError(f"lossless re-encoding changed pixels of {image_out}")
            shutil.copyfile(src / label_rel, dst / label_rel)
            out_lines.append(
                f"{_PREFIX}{image_out.relative_to(dst).as_posix()} {_PREFIX}{label_rel}"
            )
        (dst / f"{split}.txt").write_text("\n".join(out_lines) + "\n")
        logger.info("%s: %d pairs written to %s", split, len(out_lines), dst)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    _src = Path(sys.argv[1])
    _dst = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(__file__).parent / "camvid_sample"
    _make_sample(_src, _dst)
