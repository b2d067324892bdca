"""Token-fate pictures: what a configuration did to the tokens of one image.

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

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor

from tokred.state import TokenState

__all__ = ["CAMVID_PALETTE", "embedding_state", "find_label", "load_image", "load_label", "palette",
           "token_fate_figure", "unique_path", "viz_job"]

log = logging.getLogger(__name__)

#: CamVid (SegNet 11-class) colours, RGB, by train id: Sky, Building, Pole, Road, Pavement, Tree, SignSymbol,
#: Fence, Car, Pedestrian, Bicyclist (the colours of the CamVid class definitions).
CAMVID_PALETTE: tuple[tuple[int, int, int], ...] = (
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
    (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192))
_LIVE_COLOR = (0.86, 0.86, 0.86)


# ---------------------------------------------------------------------------------------------- inputs
def load_image(path: str | Path, crop_size: tuple[int, int]) -> tuple[Tensor, np.ndarray]:
    """Reads an image and resizes it to the network input, as evaluation does (bilinear).

    Args:
        path: an RGB image file (PNG, JPEG, WebP, ...).
        crop_size: ``(H, W)`` px of the network input.

    Returns:
        ``(image [1, 3, H, W] ImageNet-normalised float32, rgb [H, W, 3] uint8)``.

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
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((x - mean) / std)[None], rgb


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
        dataset: data set name (``camvid``, ``camvid_sample``, ``ade20k``, ``cityscapes``): its raw-to-train-id
            table; unknown values become the ignore value 255.
        size: ``(H, W)`` px.

    Returns:
        ``[1, H, W]`` (long) train ids, 255 = ignore.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: an unknown data set name.
    """
    from PIL import Image

    from tokred.data import datasets

    luts = {"camvid": datasets.camvid_lut, "camvid_sample": datasets.camvid_lut, "ade20k": datasets.ade20k_lut,
            "cityscapes": datasets.cityscapes_lut}
    if dataset not in luts:
        raise ValueError(f"dataset {dataset!r} has no label table here; valid: {', '.join(luts)}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"viz.label={path} does not exist")
    h, w = size
    with Image.open(path) as im:
        raw = np.asarray(im.convert("L") if im.mode not in ("L", "P", "I;16", "I") else im, dtype=np.int64)
        raw = np.asarray(Image.fromarray(raw.astype(np.uint8)).resize((w, h), Image.NEAREST), dtype=np.int64)
    lut = luts[dataset]().astype(np.int64)
    ids = lut[np.clip(raw, 0, 255)]
    ids[ids < 0] = 255
    return torch.from_numpy(ids)[None]


def palette(dataset: str, num_classes: int) -> np.ndarray:
    """``[K, 3]`` uint8 class colours: CamVid's own colours, else a fixed qualitative palette."""
    if dataset in ("camvid", "camvid_sample") and num_classes == len(CAMVID_PALETTE):
        return np.array(CAMVID_PALETTE, dtype=np.uint8)
    import matplotlib

    cmap = matplotlib.colormaps["tab20"] if num_classes <= 20 else matplotlib.colormaps["hsv"]
    vals = np.linspace(0, 1, num_classes, endpoint=False) if num_classes > 20 else np.arange(num_classes) / 20
    return (np.array([cmap(v)[:3] for v in vals]) * 255).astype(np.uint8)


def unique_path(path: str | Path) -> Path:
    """``path`` if free, else ``<stem>-2<suffix>``, ``-3``, ... (never an existing file)."""
    path = Path(path)
    out, k = path, 1
    while out.exists():
        k += 1
        out = path.with_name(f"{path.stem}-{k}{path.suffix}")
    return out


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
    from tokred.encoder import EmbedContext

    enc = seg.encoder
    ctx = EmbedContext(image=image, target=target, encoder=enc)
    embedder = next((r for r in enc.reducers if r.replaces_embedding), None)
    x, state = embedder.embed(ctx) if embedder is not None else enc.embed(image)
    for r in enc.reducers:
        x, state = r.on_embed(x, state, ctx)
    return state


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
    from matplotlib.colors import ListedColormap
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
    blocks = np.arange(depth)
    cmap_blocks = matplotlib.colormaps["plasma"](np.linspace(0.05, 0.9, max(depth, 1)))[:, :3]
    colors = np.concatenate([[(0.2, 0.2, 0.2)], cmap_blocks, [_LIVE_COLOR]], 0)  # before block 1 | 1..depth | live
    index = np.clip(exit_block, -1, depth) + 1  # [H0, W0] in [0, depth + 1]
    ax_fate.imshow(rgb, alpha=0.35)
    ax_fate.imshow(index, cmap=ListedColormap(colors), vmin=-0.5, vmax=depth + 1.5, alpha=0.75, interpolation="nearest",
                   extent=(-0.5, W - 0.5, H - 0.5, -0.5))
    ax_fate.add_collection(LineCollection(_boundaries(final_map, patch), colors="black", linewidths=0.4, alpha=0.6))
    present = sorted(set(index.ravel().tolist()))
    labels = {0: "left before block 1", depth + 1: "live to the end",
              **{int(b) + 1: f"left after block {int(b) + 1}" for b in blocks}}  # index k = 0-based block + 1
    handles = [Patch(facecolor=colors[k], label=labels[k]) for k in present]
    ax_fate.legend(handles=handles, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.02),
                   ncol=min(len(handles), 3), frameon=False)
    ax_fate.set_title(f"token fate: {int((exit_block < depth).sum())} of {n0} cells left early", fontsize=9)

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
    x = np.arange(1, len(tokens_per_block) + 1)
    ax_strip.bar(x, tokens_per_block, color=cmap_blocks[: len(x)], width=0.75)
    ax_strip.axhline(n0, color="0.4", lw=0.8, ls="--")
    ax_strip.text(x[-1] + 0.45 if len(x) else 1, n0, f"N0 = {n0}", fontsize=7, va="bottom", ha="right", color="0.3")
    for xi, v in zip(x, tokens_per_block):
        ax_strip.text(xi, v, f"{v:.0f}", ha="center", va="bottom", fontsize=7)
    ax_strip.set_xticks(x)
    ax_strip.set_xlim(0.4, max(len(x), 1) + 0.6)
    ax_strip.set_ylim(0, n0 * 1.18)
    ax_strip.set_xlabel("block (1-based)", fontsize=8)
    ax_strip.set_ylabel("tokens", fontsize=8)
    ax_strip.tick_params(labelsize=7)
    ax_strip.set_title("live tokens per block", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.04, right=0.99, top=0.9 if title else 0.95, bottom=0.1)
    return fig


def viz_job(cfg: DictConfig) -> Path:
    """``python -m tokred viz [overrides] viz.image=PATH [viz.out=PNG] [viz.label=PATH] [checkpoint=PATH]``.

    Builds the configured model (loading ``checkpoint=`` when given), runs it on the image and writes the
    token-fate PNG (module docstring). ``+image=`` / ``+out=`` / ``+label=`` are accepted as short forms.

    Returns:
        The PNG written.

    Raises:
        ValueError: no image given, or the configuration cannot be built.
        FileNotFoundError: the image, label or checkpoint does not exist.
    """
    import matplotlib.pyplot as plt

    from tokred.cli import build_model_from_config, method_name, resolve_device
    from tokred.data import dataset_info
    from tokred.engine.checkpoint import load_checkpoint

    opts = dict(cfg.get("viz") or {})
    image_path = opts.get("image") or cfg.get("image")
    if not image_path:
        raise ValueError("tokred viz needs an image: python -m tokred viz viz.image=PATH [viz.out=PNG] "
                         "[checkpoint=PATH] [merger=... pruner=...]")
    out_opt = opts.get("out") or cfg.get("out")
    label_opt = opts.get("label") or cfg.get("label")
    crop = tuple(int(v) for v in cfg.dataset.crop_size)
    device = resolve_device(cfg.device)
    seg = build_model_from_config(cfg)
    if cfg.checkpoint:
        seg.load_state_dict(load_checkpoint(cfg.checkpoint)["model"])
    seg = seg.to(device).eval()
    image, rgb = load_image(image_path, crop)
    label_path = Path(label_opt) if label_opt else find_label(image_path)
    target = None if label_path is None else load_label(label_path, str(cfg.dataset.name), crop).to(device)
    if label_path is not None:
        log.info("label %s (passed to the forward for oracle policies)", label_path)
    image = image.to(device)
    with torch.no_grad():
        first = embedding_state(seg, image, target)
        out = seg(image, target)
    state = out.state
    depth = len(state.tokens_per_block)
    info = dataset_info(str(cfg.dataset.name))
    method = method_name(cfg)
    fig = token_fate_figure(
        rgb, out.logits.argmax(1)[0].cpu().numpy(), first.token_map[0].view(*state.grid_size).cpu().numpy(),
        state.token_map[0].view(*state.grid_size).cpu().numpy(), state.cell_exit_block(depth)[0].cpu().numpy(),
        [float(t[0]) for t in state.tokens_per_block], depth, palette(info.name, int(cfg.dataset.num_classes)),
        info.class_names,
        title=f"{method} on {Path(image_path).name} ({cfg.model.name}, {crop[0]}x{crop[1]} px"
              f"{', ' + Path(str(cfg.checkpoint)).parent.name if cfg.checkpoint else ', untrained'})")
    default = Path("results/viz") / f"{Path(image_path).stem}_{method}.png"
    path = unique_path(Path(out_opt) if out_opt else default)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    log.info("token-fate picture %s", path)
    return path
