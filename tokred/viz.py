"""Token-fate pictures: what a configuration did to the tokens of one image (the figure; the job that
builds the model and writes the PNG is ``tokred.jobs.viz``).

``python -m tokred viz [overrides] viz.image=PATH [viz.out=PNG] [viz.label=PATH] [checkpoint=PATH]``, e.g.::

    python -m tokred viz merger=dcts pruner=early_exit checkpoint=results/runs/X/last.pth \\
        viz.image=../shared/data/CamVid/test/0001TP_008550.png

draws, for the image resized to ``dataset.crop_size``:

1. the image with the token layout after embedding drawn over it (token boundaries from the ``token_map`` of
   the state the embedding stage returns: dCTS/CTS supertokens appear as large cells);
2. the block after which each cell's token left the encoder (``TokenState.cell_exit_block``: halted by an early
   exit or pruned), colour-coded, cells whose token stayed live to the end in grey, with the boundaries of the
   final tokens (ToMe merges) drawn over it;
3. the final prediction in the data set's palette (CamVid: its standard class colours);
4. a strip with the live patch tokens entering each block (``tokens_per_block``).

The label is looked for next to the image (SegNet CamVid ``<split>annot/<stem>.png``, ADE20K
``annotations/<split>/<stem>.png``, Cityscapes ``gtFine/.../<stem>_gtFine_labelIds.png``) or given as
``viz.label=PATH``; it is passed to the forward for oracle policies (``merger.policy=oracle``) and never used
otherwise. The PNG goes to ``viz.out`` or ``results/viz/<image stem>_<method>.png``; an existing file is never
overwritten (``-2``, ``-3``, ... are appended).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from tokred.state import TokenState

__all__ = ["embedding_state", "find_label", "load_image", "load_label", "palette", "token_fate_figure"]

_LIVE_COLOR = (0.86, 0.86, 0.86)


# ---------------------------------------------------------------------------------------------- inputs
def load_image(path: str | Path, crop_size: tuple[int, int], mean: tuple[float, float, float] | None = None,
               std: tuple[float, float, float] | None = None) -> tuple[Tensor, np.ndarray]:
    """Reads an image and resizes it to the network input, as evaluation does (bilinear).

    Args:
        path: an RGB image file (PNG, JPEG, WebP, ...).
        crop_size: ``(H, W)`` px of the network input.
        mean / std: per-channel normalisation on [0, 1] pixels (``tokred.config.input_normalization``);
            default ImageNet's.

    Returns:
        ``(image [1, 3, H, W] normalised float32, rgb [H, W, 3] uint8)``.

    Raises:
        FileNotFoundError: no file at ``path``.
    """
    from PIL import Image

    from tokred.data.info import IMAGENET_MEAN, IMAGENET_STD

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"viz.image={path} does not exist; pass viz.image=PATH to an image file")
    h, w = (int(v) for v in crop_size)
    with Image.open(path) as im:
        rgb = np.array(im.convert("RGB").resize((w, h), Image.BILINEAR), dtype=np.uint8)  # [H, W, 3]
    x = torch.from_numpy(rgb).permute(2, 0, 1).float().div(255.0)  # [3, H, W] in [0, 1]
    m = torch.tensor(IMAGENET_MEAN if mean is None else mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(IMAGENET_STD if std is None else std, dtype=torch.float32).view(3, 1, 1)
    return ((x - m) / s)[None], rgb


def find_label(image_path: str | Path) -> Path | None:
    """The label map next to an image in the SegNet CamVid, ADE20K or Cityscapes layout, or None."""
    p = Path(image_path)
    stem = p.stem
    candidates = [p.parent.parent / f"{p.parent.name}annot" / f"{stem}.png",  # CamVid: test/x.png, testannot/x.png
                  p.parent.parent.parent / "annotations" / p.parent.name / f"{stem}.png"]  # ADE20K
    if stem.endswith("_leftImg8bit"):  # Cityscapes: leftImg8bit/<split>/<city>/x_leftImg8bit.png
        base = stem[: -len("_leftImg8bit")]
        candidates.append(p.parents[3] / "gtFine" / p.parent.parent.name / p.parent.name
                          / f"{base}_gtFine_labelIds.png" if len(p.parents) > 3 else p)
    return next((c for c in candidates if c != p and c.is_file()), None)


def load_label(path: str | Path, dataset: str, size: tuple[int, int]) -> Tensor:
    """Reads a label map, converts raw values to train ids and resizes it (nearest) to ``size``.

    Args:
        path: the label PNG.
        dataset: a registered data set name (``tokred.plugins.DATASETS``): its spec's raw-to-train-id ``lut``;
            unknown values become the ignore value 255.
        size: ``(H, W)`` px.

    Returns:
        ``[1, H, W]`` (long) train ids, 255 = ignore.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: an unknown data set name.
    """
    from PIL import Image

    from tokred.plugins import DATASETS

    try:
        table = getattr(DATASETS.get(dataset), "lut", ())
    except KeyError as err:  # the registry's message lists the valid names
        raise ValueError(err.args[0]) from err
    if len(table) != 256:
        raise ValueError(f"dataset {dataset!r} has no 256-entry label table (its spec's lut); valid data sets: "
                         f"{', '.join(DATASETS.names())}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"viz.label={path} does not exist")
    h, w = size
    with Image.open(path) as im:
        raw = np.asarray(im.convert("L") if im.mode not in ("L", "P", "I;16", "I") else im, dtype=np.int64)
        raw = np.asarray(Image.fromarray(raw.astype(np.uint8)).resize((w, h), Image.NEAREST), dtype=np.int64)
    lut = np.asarray(table, dtype=np.int64)
    ids = lut[np.clip(raw, 0, 255)]
    ids[ids < 0] = 255
    return torch.from_numpy(ids)[None]


def palette(dataset: str, num_classes: int) -> np.ndarray:
    """``[K, 3]`` uint8 class colours: the data set spec's ``palette`` (``tokred.plugins.DATASETS``), else a
    fixed qualitative palette (tab20 up to 20 classes, evenly spaced hues beyond)."""
    from tokred.plugins import DATASETS

    try:
        spec_palette = getattr(DATASETS.get(dataset), "palette", None)
    except (KeyError, ValueError, ImportError):  # a data set without a spec (or a spec that cannot be imported)
        spec_palette = None
    if spec_palette is not None and len(spec_palette) >= num_classes:
        return np.asarray(spec_palette, dtype=np.uint8)[:num_classes].reshape(num_classes, 3)
    import matplotlib

    cmap = matplotlib.colormaps["tab20"] if num_classes <= 20 else matplotlib.colormaps["hsv"]
    vals = np.linspace(0, 1, num_classes, endpoint=False) if num_classes > 20 else np.arange(num_classes) / 20
    return (np.array([cmap(v)[:3] for v in vals]) * 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------- model side
@torch.no_grad()
def embedding_state(seg: torch.nn.Module, image: Tensor, target: Tensor | None = None) -> TokenState:
    """The token state after the embedding stage (embedding plus every reducer's ``on_embed``).

    Runs the same public hooks as ``tokred.encoder.Encoder.forward`` does before block 0: the reducer with
    ``replaces_embedding`` (dCTS/CTS supertokens) or the standard embedding, then each ``on_embed``.

    Args:
        seg: a ``tokred.models.segmenter.Segmenter``.
        image: ``[B, 3, H, W]`` normalised images.
        target: ``[B, H, W]`` labels for oracle policies, or None.

    Returns:
        The state whose ``token_map [B, N0]`` gives the tokens entering block 0.
    """
    return seg.encoder.embed_stage(image, target)[1]


def _boundaries(token_map: np.ndarray, patch: tuple[int, int]) -> np.ndarray:
    """``[S, 2, 2]`` pixel segments between neighbouring cells held by different tokens.

    Args:
        token_map: ``[H0, W0]`` token (or bank code) per cell.
        patch: ``(ph, pw)`` px per cell.
    """
    ph, pw = patch
    vi, vj = np.nonzero(token_map[:, :-1] != token_map[:, 1:])  # vertical edge right of (i, j)
    hi, hj = np.nonzero(token_map[:-1, :] != token_map[1:, :])  # horizontal edge below (i, j)
    v = np.stack([np.stack([(vj + 1) * pw, vi * ph], -1), np.stack([(vj + 1) * pw, (vi + 1) * ph], -1)], 1)
    h = np.stack([np.stack([hj * pw, (hi + 1) * ph], -1), np.stack([(hj + 1) * pw, (hi + 1) * ph], -1)], 1)
    return np.concatenate([v, h], 0).astype(float) - 0.5  # [S, 2 points, (x, y)], pixel-centre coordinates


def token_fate_figure(rgb: np.ndarray, prediction: np.ndarray, embed_map: np.ndarray, final_map: np.ndarray,
                      exit_block: np.ndarray, tokens_per_block: list[float], depth: int, class_colors: np.ndarray,
                      class_names: tuple[str, ...] = (), title: str = "") -> Any:
    """Draws the four-part token-fate figure (see the module docstring).

    Args:
        rgb: ``[H, W, 3]`` uint8 input image (px).
        prediction: ``[H, W]`` predicted train ids.
        embed_map: ``[H0, W0]`` token per cell after embedding.
        final_map: ``[H0, W0]`` token (>= 0) or bank code (< 0) per cell at the end of the encoder.
        exit_block: ``[H0, W0]`` 0-based block after which each cell's token left; ``depth`` = live to the end.
        tokens_per_block: live patch tokens entering each block (``depth`` values).
        depth: encoder depth.
        class_colors: ``[K, 3]`` uint8 colours.
        class_names: ``K`` names for the prediction legend.
        title: figure title.

    Returns:
        The matplotlib ``Figure``; its axes are titled ``"tokens after embedding ..."``, ``"token fate ..."``,
        ``"prediction"`` and ``"live tokens per block"``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection
    from matplotlib.patches import Patch

    H, W = rgb.shape[:2]
    H0, W0 = embed_map.shape
    patch = (H // H0, W // W0)
    n0 = H0 * W0
    panel_w = 4.6
    fig = plt.figure(figsize=(3 * panel_w + 0.6, panel_w * H / W + 2.9), dpi=120)
    gs = fig.add_gridspec(2, 3, height_ratios=[panel_w * H / W, 1.7], hspace=0.42, wspace=0.05)
    ax_img, ax_fate, ax_pred = (fig.add_subplot(gs[0, k]) for k in range(3))
    ax_strip = fig.add_subplot(gs[1, :])

    # 1. layout after embedding
    n_embed = len(np.unique(embed_map))
    ax_img.imshow(rgb)
    ax_img.add_collection(LineCollection(_boundaries(embed_map, patch), colors="white", linewidths=0.6, alpha=0.9))
    ax_img.set_title(f"tokens after embedding: {n_embed} of {n0} patches", fontsize=9)

    # 2. fate: block after which the token left (0-based in code, shown 1-based)
    cmap_blocks = matplotlib.colormaps["plasma"](np.linspace(0.05, 0.9, max(depth, 1)))[:, :3]
    _fate_panel(ax_fate, rgb, final_map, exit_block, depth, cmap_blocks, patch)

    # 3. prediction
    pred = np.clip(prediction, 0, len(class_colors) - 1)
    ax_pred.imshow(class_colors[pred])
    ax_pred.set_title("prediction", fontsize=9)
    shown = np.unique(pred)
    if class_names:
        ax_pred.legend(handles=[Patch(facecolor=class_colors[k] / 255.0, label=class_names[k]) for k in shown],
                       fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.02), ncol=min(len(shown), 4),
                       frameon=False)
    for ax in (ax_img, ax_fate, ax_pred):
        ax.set_xlim(-0.5, W - 0.5)
        ax.set_ylim(H - 0.5, -0.5)
        ax.set_xticks([])
        ax.set_yticks([])

    # 4. live tokens per block
    _strip_panel(ax_strip, tokens_per_block, n0, cmap_blocks)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.04, right=0.99, top=0.9 if title else 0.95, bottom=0.1)
    return fig


def _fate_panel(ax: Any, rgb: np.ndarray, final_map: np.ndarray, exit_block: np.ndarray, depth: int,
                cmap_blocks: np.ndarray, patch: tuple[int, int]) -> None:
    """Panel 2: the block after which each cell's token left, with the final token boundaries."""
    from matplotlib.collections import LineCollection
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    H, W = rgb.shape[:2]
    blocks = np.arange(depth)
    colors = np.concatenate([[(0.2, 0.2, 0.2)], cmap_blocks, [_LIVE_COLOR]], 0)  # before block 1 | 1..depth | live
    index = np.clip(exit_block, -1, depth) + 1  # [H0, W0] in [0, depth + 1]
    ax.imshow(rgb, alpha=0.35)
    ax.imshow(index, cmap=ListedColormap(colors), vmin=-0.5, vmax=depth + 1.5, alpha=0.75, interpolation="nearest",
              extent=(-0.5, W - 0.5, H - 0.5, -0.5))
    ax.add_collection(LineCollection(_boundaries(final_map, patch), colors="black", linewidths=0.4, alpha=0.6))
    present = sorted(set(index.ravel().tolist()))
    labels = {0: "left before block 1", depth + 1: "live to the end",
              **{int(b) + 1: f"left after block {int(b) + 1}" for b in blocks}}  # index k = 0-based block + 1
    handles = [Patch(facecolor=colors[k], label=labels[k]) for k in present]
    ax.legend(handles=handles, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.02),
              ncol=min(len(handles), 3), frameon=False)
    ax.set_title(f"token fate: {int((exit_block < depth).sum())} of {exit_block.size} cells left early", fontsize=9)


def _strip_panel(ax: Any, tokens_per_block: list[float], n0: int, cmap_blocks: np.ndarray) -> None:
    """Panel 4: bars of the live patch tokens entering each block, against ``N0``."""
    x = np.arange(1, len(tokens_per_block) + 1)
    ax.bar(x, tokens_per_block, color=cmap_blocks[: len(x)], width=0.75)
    ax.axhline(n0, color="0.4", lw=0.8, ls="--")
    ax.text(x[-1] + 0.45 if len(x) else 1, n0, f"N0 = {n0}", fontsize=7, va="bottom", ha="right", color="0.3")
    for xi, v in zip(x, tokens_per_block):
        ax.text(xi, v, f"{v:.0f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x)
    ax.set_xlim(0.4, max(len(x), 1) + 0.6)
    ax.set_ylim(0, n0 * 1.18)
    ax.set_xlabel("block (1-based)", fontsize=8)
    ax.set_ylabel("tokens", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_title("live tokens per block", fontsize=9)
