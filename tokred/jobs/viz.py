"""``python -m tokred viz [overrides] viz.image=PATH [viz.out=PNG] [viz.label=PATH] [checkpoint=PATH]``.

Builds the configured model, runs it on one image and writes the token-fate PNG of ``tokred.viz``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from tokred.config import build_model_from_config, method_name, resolve_device
from tokred.io import eval_mode, unique_path
from tokred.viz import embedding_state, find_label, load_image, load_label, palette, token_fate_figure

__all__ = ["viz_job"]

log = logging.getLogger(__name__)


def viz_job(cfg: DictConfig) -> Path:
    """Writes the token-fate picture of ``viz.image`` (``+image=`` / ``+out=`` / ``+label=`` also accepted).

    The label (``viz.label``, else found next to the image) is passed to the forward for oracle policies only.
    The PNG goes to ``viz.out`` or ``results/viz/<image stem>_<method>.png``; an existing file is never
    overwritten (``-2``, ``-3``, ... are appended).

    Returns:
        The PNG written.

    Raises:
        ValueError: no image given, or the configuration cannot be built.
        FileNotFoundError: the image, label or checkpoint does not exist.
    """
    import matplotlib.pyplot as plt

    from tokred.data import dataset_info
    from tokred.models.checkpoints import load_segmentation_checkpoint

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
        load_segmentation_checkpoint(seg, cfg.checkpoint, str(cfg.get("checkpoint_format", "auto")))
    seg = seg.to(device)
    from tokred.config import input_normalization

    norm = input_normalization(cfg)  # the weights' mean/std, as evaluation uses
    image, rgb = load_image(image_path, crop, tuple(norm.mean), tuple(norm.std))
    label_path = Path(label_opt) if label_opt else find_label(image_path)
    target = None if label_path is None else load_label(label_path, str(cfg.dataset.name), crop).to(device)
    if label_path is not None:
        log.info("label %s (passed to the forward for oracle policies)", label_path)
    image = image.to(device)
    with eval_mode(seg), torch.no_grad():
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
