"""Whole released segmentation checkpoints (encoder + decoder) loaded into tokred's ``Segmenter``.

Three layouts are understood, told apart by their key names (``format="auto"``):

* ``segmenter``: the Segmenter authors' ``checkpoint.pth`` (Strudel et al., ICCV 2021; ``{"model": ...}``
  with ``encoder.*`` ViT keys and ``decoder.*`` keys of their linear or mask-transformer decoder), with the
  ``variant.yml`` written beside it, which is read (``yaml.safe_load``) to check backbone, decoder and number
  of classes against the model;
* ``mmseg``: mmsegmentation's Segmenter (``{"state_dict": ...}`` with ``backbone.*`` and ``decode_head.*``);
* ``tokred``: tokred's own ``Segmenter.state_dict()`` (``encoder.vit.*``, ``decoder.*``), bare or wrapped.

Files are read with ``torch.load(weights_only=True)`` (or safetensors): no pickled code runs. Non-tensor
entries (epoch, optimizer state, meta) are dropped. The position embedding is resampled to the model's grid.
Parameters only tokred has (reducer heads under ``encoder.reducers.``) keep their initial values.
"""

from __future__ import annotations

import logging
import math
import pickle
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tokred.engine.checkpoint import read_torch_file
from tokred.models.decoders import LinearDecoder, MaskTransformerDecoder

__all__ = ["FORMATS", "check_segmentation_checkpoint", "checkpoint_normalization", "detect_format", "guess_model",
           "load_segmentation_checkpoint", "load_state_dict_checked", "read_checkpoint", "summarise_mismatch",
           "to_tokred_keys"]

log = logging.getLogger(__name__)

#: checkpoint layouts ``load_segmentation_checkpoint`` understands (plus ``"auto"``)
FORMATS: tuple[str, ...] = ("segmenter", "mmseg", "tokred")

_WRAPPERS = ("model", "state_dict", "module", "model_state")


def read_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Tensor]:
    """The flat tensor state dict in ``path`` (``.pth``/``.pt``/``.bin`` or ``.safetensors``).

    ``model`` / ``state_dict`` / ``module`` wrappers are unwrapped; non-tensor entries are dropped. ``mmap=True``
    maps a ``.pth`` instead of reading it (cheap when only the key names are needed; tensors are read lazily).

    Raises:
        FileNotFoundError: no such file.
        ValueError: unreadable, truncated or random file, pickled objects (tokred never runs pickled code), or
            no tensors in it; the message names the file and the fix (``tokred.engine.checkpoint``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass checkpoint=PATH to a local file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path))
        except Exception as err:  # safetensors raises its own SafetensorError (not a public class)
            raise ValueError(f"{path} is not a complete safetensors file ({type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else ''}); re-download or pass another "
                             "file") from None
    else:
        try:  # a legacy (non-zip) or unreadable file is read fully below, failing with tokred's messages
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True) if mmap else None
        except (RuntimeError, ValueError, OSError, EOFError, pickle.UnpicklingError):
            obj = None
        if obj is None:
            obj = read_torch_file(path, "cpu")
    for _ in range(3):  # nested wrappers ({"model": {"state_dict": ...}})
        if isinstance(obj, Mapping):
            inner = next((obj[k] for k in _WRAPPERS if isinstance(obj.get(k), Mapping)), None)
            if inner is not None and any(isinstance(v, Tensor) for v in inner.values()):
                obj = inner
                continue
        break
    if not isinstance(obj, Mapping):
        raise ValueError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict")
    sd = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    if not sd:
        raise ValueError(f"checkpoint {path} holds no tensors (keys: {list(obj)[:8]})")
    if all(k.startswith("module.") for k in sd):  # DistributedDataParallel
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


# ---------------------------------------------------------------------------------------------- key maps
def _segmenter_key(key: str) -> str | None:
    """Segmenter authors' key -> tokred key (None: not used by tokred)."""
    if key.startswith("encoder."):
        rest = key[len("encoder."):]
        if rest.startswith(("head.", "pre_logits.")):
            return None
        return "encoder.vit." + rest
    if key.startswith("decoder."):
        rest = key[len("decoder."):]
        rest = re.sub(r"^proj_dec\.", "proj_in.", rest)
        rest = re.sub(r"^decoder_norm\.", "norm.", rest)
        if rest in ("proj_patch", "proj_classes"):  # raw [D, D] parameters used as x @ W
            rest += ".weight"
        return "decoder." + rest
    return None


def _mmseg_layer(rest: str) -> str:
    """mmseg ``TransformerEncoderLayer`` key tail -> timm ``Block`` key tail."""
    for old, new in (("ln1.", "norm1."), ("ln2.", "norm2."), ("attn.attn.in_proj_weight", "attn.qkv.weight"),
                     ("attn.attn.in_proj_bias", "attn.qkv.bias"), ("attn.attn.out_proj.", "attn.proj."),
                     ("ffn.layers.0.0.", "mlp.fc1."), ("ffn.layers.1.", "mlp.fc2.")):
        if rest.startswith(old):
            return new + rest[len(old):]
    return rest


def _mmseg_key(key: str) -> str | None:
    """mmseg Segmenter key -> tokred key (None: not used by tokred, e.g. ``auxiliary_head``)."""
    m = re.match(r"^(backbone|decode_head)\.layers\.(\d+)\.(.*)$", key)
    if m:
        owner = "encoder.vit" if m.group(1) == "backbone" else "decoder"
        return f"{owner}.blocks.{m.group(2)}.{_mmseg_layer(m.group(3))}"
    if key.startswith("backbone."):
        rest = key[len("backbone."):]
        rest = re.sub(r"^patch_embed\.projection\.", "patch_embed.proj.", rest)
        rest = re.sub(r"^ln1\.", "norm.", rest)  # the final norm (final_norm=True)
        return "encoder.vit." + rest
    if key.startswith("decode_head."):
        rest = key[len("decode_head."):]
        for old, new in (("dec_proj.", "proj_in."), ("decoder_norm.", "norm."), ("patch_proj.", "proj_patch."),
                         ("classes_proj.", "proj_classes."), ("conv_seg.", "head.")):
            if rest.startswith(old):
                rest = new + rest[len(old):]
                break
        return "decoder." + rest
    return None


def _tokred_key(key: str) -> str | None:
    return key if key.startswith(("encoder.", "decoder.")) else None


_KEY_MAPS: dict[str, Callable[[str], str | None]] = {"segmenter": _segmenter_key, "mmseg": _mmseg_key,
                                                      "tokred": _tokred_key}


def detect_format(sd: Mapping[str, Tensor]) -> str:
    """``"segmenter"``, ``"mmseg"`` or ``"tokred"`` from the key names of ``sd``.

    Raises:
        ValueError: keys matching no format (lists the formats and the first keys).
    """
    keys = list(sd)
    if any(k.startswith("encoder.vit.") for k in keys):
        return "tokred"
    if any(k.startswith("backbone.") for k in keys) and any(k.startswith("decode_head.") for k in keys):
        return "mmseg"
    if any(k.startswith("encoder.blocks.") for k in keys) and any(k.startswith("decoder.") for k in keys):
        return "segmenter"
    raise ValueError(f"checkpoint keys match no known format ({', '.join(FORMATS)}): expected 'encoder.vit.*' "
                     f"(tokred), 'backbone.*' + 'decode_head.*' (mmseg) or 'encoder.blocks.*' + 'decoder.*' "
                     f"(Segmenter authors); first keys: {keys[:6]}")


def to_tokred_keys(sd: Mapping[str, Tensor], fmt: str) -> tuple[dict[str, Tensor], list[str]]:
    """Renames (and where needed transposes / reshapes) ``sd`` from layout ``fmt`` to tokred's keys.

    Returns:
        ``(tokred state dict, source keys tokred does not use)``.
    """
    mapper = _KEY_MAPS[fmt]
    out: dict[str, Tensor] = {}
    skipped: list[str] = []
    for key, value in sd.items():
        new = mapper(key)
        if new is None:
            skipped.append(key)
            continue
        if fmt == "segmenter" and new in ("decoder.proj_patch.weight", "decoder.proj_classes.weight"):
            value = value.t()  # x @ W  ==  Linear with weight W^T
        if fmt == "mmseg" and new in ("decoder.head.weight",) and value.ndim == 4:
            value = value.flatten(1)  # 1x1 conv [K, C, 1, 1] -> linear [K, C]
        out[new] = value
    return out, skipped


# ---------------------------------------------------------------------------------------------- checks
def _hint(key: str) -> str:
    if key.startswith("encoder."):
        return "model= (embed_dim / depth / num_heads / patch_size of the checkpoint's backbone)"
    if re.search(r"(cls_emb|mask_norm|head)\b", key):
        return "dataset.num_classes (the checkpoint's number of classes) or decoder="
    return "decoder= (linear / mask_transformer) and decoder.kwargs (d_model, num_layers, qkv_bias)"


def _resample_pos_embed(pe: Tensor, own: Tensor, grid: tuple[int, int], old_grid: tuple[int, int] | None) -> Tensor:
    """``pe [1, P + Hs*Ws, C]`` -> ``[1, P + H0*W0, C]`` (bicubic on the patch part, prefix rows kept)."""
    from timm.layers import resample_abs_pos_embed

    prefix = own.shape[1] - grid[0] * grid[1]
    n_old = pe.shape[1] - prefix
    if old_grid is None or old_grid[0] * old_grid[1] != n_old:
        side = math.isqrt(n_old)
        if side * side != n_old:
            raise ValueError(f"checkpoint pos_embed {tuple(pe.shape)} holds {n_old} patch positions, not a square "
                             "grid; put the training image_size in variant.yml beside the checkpoint")
        old_grid = (side, side)
    if tuple(old_grid) == tuple(grid):
        return pe
    log.info("resampling pos_embed from grid %s to %s", old_grid, grid)
    return resample_abs_pos_embed(pe, new_size=list(grid), old_size=list(old_grid), num_prefix_tokens=prefix)


def _read_variant(path: Path) -> dict[str, Any] | None:
    variant = path.parent / "variant.yml"
    if not variant.is_file():
        return None
    import yaml

    with open(variant, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    return data if isinstance(data, dict) else None


def _check_variant(seg, variant: Mapping[str, Any], where: Path) -> tuple[int, int] | None:
    """Compares ``variant.yml``'s ``net_kwargs`` with the model; returns the checkpoint's patch grid if given.

    Raises:
        ValueError: backbone width / depth / heads / patch size, decoder kind or class count disagree.
    """
    net = variant.get("net_kwargs") or {}
    enc = seg.encoder
    problems = []
    for key, own, option in (("d_model", enc.embed_dim, "model="), ("n_layers", enc.depth, "model="),
                             ("n_heads", enc.num_heads, "model="), ("n_cls", seg.num_classes, "dataset.num_classes")):
        if key in net and int(net[key]) != int(own):
            problems.append(f"{key}={net[key]} (model: {own}; set {option})")
    if "patch_size" in net and int(net["patch_size"]) != int(enc.patch_size[0]):
        problems.append(f"patch_size={net['patch_size']} (model: {enc.patch_size[0]}; set model=)")
    dec_name = (net.get("decoder") or {}).get("name")
    own_dec = {LinearDecoder: "linear", MaskTransformerDecoder: "mask_transformer"}.get(type(seg.decoder))
    if dec_name and own_dec and dec_name != own_dec:
        problems.append(f"decoder {dec_name} (model: {own_dec}; set decoder={dec_name})")
    if problems:
        raise ValueError(f"{where} ({net.get('backbone', '?')}) does not describe this model: {'; '.join(problems)}")
    size = net.get("image_size")
    if size is None:
        return None
    size = (size, size) if isinstance(size, int) else tuple(size)
    p = int(net.get("patch_size", enc.patch_size[0]))
    return int(size[0]) // p, int(size[1]) // p


# ---------------------------------------------------------------------------------------------- mismatches
def _shape(t: Any) -> list[int]:
    return [int(v) for v in (t.shape if hasattr(t, "shape") else t)]


def guess_model(sd: Mapping[str, Any]) -> list[str]:
    """``configs/model`` options whose width, depth and patch size fit the tokred/timm backbone tensors in ``sd``.

    Args:
        sd: state dict (tensors or shapes) with ``encoder.vit.*`` or bare timm ViT keys.

    Returns:
        Matching option names (e.g. ``["vit_small", "dinov2_small_reg"]``), ``[]`` when none fits or the
        backbone tensors are absent.
    """
    import yaml

    prefix = "encoder.vit." if any(k.startswith("encoder.vit.") for k in sd) else ""
    proj = sd.get(prefix + "patch_embed.proj.weight")
    if proj is None:
        return []
    width, patch = _shape(proj)[0], _shape(proj)[-1]
    blocks = {int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"blocks\.(\d+)\.", k))}
    depth = max(blocks) + 1 if blocks else None
    try:
        from tokred.config import config_dir

        files = sorted((Path(config_dir()) / "model").glob("*.yaml"))
    except (FileNotFoundError, ImportError):  # a broken install: no hint rather than an error
        return []
    names = []
    for f in files:
        c = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
        if c.get("embed_dim") == width and c.get("patch_size") == patch and (depth is None or c.get("depth") == depth):
            names.append(f.stem)
    return names


def summarise_mismatch(own: Mapping[str, Any], sd: Mapping[str, Any], what: str, strict: bool = True,
                       allowed_missing: tuple[str, ...] = ("encoder.reducers.",)) -> str | None:
    """One message for every difference between a model's state dict and a checkpoint's, or None.

    Args:
        own: the model's ``state_dict()`` (tensors or shapes), never modified.
        sd: the checkpoint's tensors (tensors or shapes), tokred key names.
        what: how the message names the file, e.g. ``"checkpoint /x/last.pth"``.
        strict: report missing and unexpected keys too (only shape differences otherwise).
        allowed_missing: key prefixes the checkpoint may lack (reducer parameters keep their init).

    Returns:
        ``"<what> is for another model: 23 keys differ in shape, e.g. encoder.vit.pos_embed [1, 197, 192] vs
        [1, 1025, 192]; 4 missing, e.g. ...; 2 unexpected, e.g. ...; did you mean model=vit_small?"``, or None
        when the checkpoint fits.
    """
    bad = [k for k in sd if k in own and _shape(sd[k]) != _shape(own[k])]
    missing = [k for k in own if k not in sd and not k.startswith(allowed_missing)] if strict else []
    unexpected = [k for k in sd if k not in own] if strict else []
    if not (bad or missing or unexpected):
        return None
    parts = []
    if bad:
        k = bad[0]
        parts.append(f"{len(bad)} keys differ in shape, e.g. {k} {_shape(sd[k])} (checkpoint) vs {_shape(own[k])} "
                     "(model)")
    if missing:
        parts.append(f"{len(missing)} missing, e.g. {', '.join(missing[:3])}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected, e.g. {', '.join(unexpected[:3])}")
    hints = []
    keys = bad + missing + unexpected
    if any(k.startswith("encoder.") for k in keys):
        names = guess_model(sd)
        own_names = guess_model(own)
        names = [n for n in names if n not in own_names] or names
        pe = "encoder.vit.pos_embed"
        only_grid = bad == [pe] and not missing and not unexpected
        if only_grid:
            hints.append(f"the patch grid differs: set dataset.crop_size to the crop the checkpoint was trained "
                         f"with ({_shape(sd[pe])[1]} position rows vs {_shape(own[pe])[1]})")
        elif names:
            hints.append("did you mean " + " or ".join(f"model={n}" for n in names[:3]) + "?")
        else:
            hints.append("check model= (embed_dim / depth / num_heads / patch_size) against the checkpoint")
    if any(k.startswith("decoder.") for k in keys) and not any(k.startswith("encoder.") for k in keys):
        hints.append("check decoder= and dataset.num_classes against the checkpoint")
    if any(k.startswith("encoder.reducers.") for k in keys):
        hints.append("check merger= / pruner= and their options against the run that wrote it")
    return f"{what} is for another model: {'; '.join(parts)}; {'; '.join(hints) or 'pass the matching file'}"


def load_state_dict_checked(model: torch.nn.Module, state_dict: Mapping[str, Tensor], what: str,
                            strict: bool = True, allowed_missing: tuple[str, ...] = ("encoder.reducers.",)):
    """``model.load_state_dict`` with every mismatch summarised in one tokred message (:func:`summarise_mismatch`).

    Args:
        model: the module to fill; untouched when the check fails.
        state_dict: tensors to load (tokred key names).
        what: how the message names the source, e.g. ``"init_from=/x/last.pth"``.
        strict: missing or unexpected keys are errors too (always for shape differences).
        allowed_missing: key prefixes the state dict may lack (reducer parameters keep their init); ``()`` for
            a resume, where every tensor must be there.

    Returns:
        torch's ``(missing_keys, unexpected_keys)`` result.

    Raises:
        ValueError: the state dict does not fit the model (counts, first examples, the option to fix).
    """
    msg = summarise_mismatch(model.state_dict(), state_dict, what, strict=strict, allowed_missing=allowed_missing)
    if msg is not None:
        raise ValueError(msg)
    # checked above: what is left missing is allowed (reducer parameters keep their init)
    return model.load_state_dict(state_dict, strict=False)


def check_segmentation_checkpoint(seg, path: str | Path, format: str = "auto") -> tuple[dict[str, Tensor], str]:
    """Reads ``path`` and checks it against ``seg`` without loading it (``seg`` is not modified).

    Args / Raises: as :func:`load_segmentation_checkpoint`.

    Returns:
        ``(tokred state dict ready for load_state_dict(strict=False), format)``.
    """
    import difflib

    if format not in ("auto", *FORMATS):
        close = difflib.get_close_matches(str(format), ["auto", *FORMATS], n=1)
        raise ValueError(f"unknown checkpoint_format {format!r}; valid: auto, {', '.join(FORMATS)}"
                         + (f" (did you mean {close[0]!r}?)" if close else ""))
    path = Path(path)
    raw = read_checkpoint(path)
    fmt = detect_format(raw) if format == "auto" else format
    sd, skipped = to_tokred_keys(raw, fmt)
    if not sd:
        raise ValueError(f"checkpoint {path} has no key of the {fmt!r} format; first keys: {list(raw)[:6]} "
                         f"(try checkpoint_format=auto)")
    old_grid = None
    if fmt == "segmenter":
        variant = _read_variant(path)
        if variant is not None:
            old_grid = _check_variant(seg, variant, path.parent / "variant.yml")
    own = seg.state_dict()
    pe_key = "encoder.vit.pos_embed"
    if pe_key in sd and pe_key in own and sd[pe_key].shape != own[pe_key].shape \
            and sd[pe_key].shape[-1] == own[pe_key].shape[-1]:
        grid = tuple(seg.encoder.vit.patch_embed.grid_size)
        sd[pe_key] = _resample_pos_embed(sd[pe_key], own[pe_key], grid, old_grid)
    kinds = {"decoder.cls_emb": "mask_transformer", "decoder.head.weight": "linear"}
    ckpt_dec = next((name for key, name in kinds.items() if key in sd), None)
    own_dec = next((name for key, name in kinds.items() if key in own), None)
    if ckpt_dec and own_dec and ckpt_dec != own_dec:
        raise ValueError(f"checkpoint {path} ({fmt}) holds a {ckpt_dec} decoder but the model has a {own_dec} one; "
                         f"set decoder={ckpt_dec}")
    unexpected = [k for k in sd if k not in own]
    encoder_off = [k for k in sd if k.startswith("encoder.") and (k not in own or sd[k].shape != own[k].shape)]
    if encoder_off:  # another backbone: one summary of every difference, with the model= it fits
        raise ValueError(summarise_mismatch(own, sd, f"checkpoint {path} ({fmt})"))
    if unexpected:
        hint = _hint(unexpected[0])
        if any(k.endswith("attn.qkv.bias") and k.startswith("decoder.") for k in unexpected):
            hint = "decoder.kwargs.qkv_bias=true (released mask-transformer decoders have qkv biases)"
        raise ValueError(f"checkpoint {path} ({fmt}) has {len(unexpected)} tensors this model has no place for, "
                         f"e.g. {unexpected[:4]}; check {hint}")
    for k, v in sd.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(f"checkpoint {path} ({fmt}): {k} has shape {tuple(v.shape)} in the checkpoint but "
                             f"{tuple(own[k].shape)} in the model; check {_hint(k)}")
    missing = [k for k in own if k not in sd and not k.startswith("encoder.reducers.")]
    if missing:
        raise ValueError(f"checkpoint {path} ({fmt}) lacks {len(missing)} tensors of the model, e.g. {missing[:4]}; "
                         f"check {_hint(missing[0])}")
    if skipped:
        log.info("checkpoint %s: ignored %d tensors tokred does not use (e.g. %s)", path, len(skipped), skipped[:3])
    return sd, fmt


def checkpoint_normalization(path: str | Path, format: str = "auto"):
    """The input normalisation a released segmentation checkpoint was trained with (its format's convention).

    ``segmenter``: ``variant.yml``'s ``dataset_kwargs.normalization`` (Segmenter's ``vit`` = 0.5 / 0.5 or
    ``deit`` = ImageNet), else ``vit`` (the authors' ViT default); ``mmseg``: ``vit`` (mmseg's Segmenter configs
    normalise 0..255 pixels with mean = std = 127.5); ``tokred``: None (the run that wrote it knows, see
    ``tokred.config.input_normalization``).

    Returns:
        A :class:`tokred.data.normalization.Normalization` (source in words), or None for ``tokred``.

    Raises:
        FileNotFoundError / ValueError: as :func:`read_checkpoint` (``auto`` reads the key names), an unknown
            format, or a ``variant.yml`` normalisation other than vit / deit / imagenet.
    """
    from tokred.data.normalization import VIT, Normalization, parse_normalization

    path = Path(path)
    fmt = detect_format(read_checkpoint(path, mmap=True)) if format == "auto" else format
    if fmt not in FORMATS:
        raise ValueError(f"unknown checkpoint_format {format!r}; valid: auto, {', '.join(FORMATS)}")
    if fmt == "tokred":
        return None
    if fmt == "segmenter":
        variant = _read_variant(path) or {}
        name = (variant.get("dataset_kwargs") or {}).get("normalization") \
            or (variant.get("net_kwargs") or {}).get("normalization")
        where = path.parent / "variant.yml"
        found = parse_normalization(name, key=f"{where} dataset_kwargs.normalization") if name else None
        if found is not None:
            return Normalization(found.mean, found.std, found.name, f"{where}: normalization {name}")
        return Normalization(VIT.mean, VIT.std, "vit", f"Segmenter checkpoint {path} (no normalization in "
                             "variant.yml): vit, the authors' ViT default")
    return Normalization(VIT.mean, VIT.std, "vit", f"mmseg checkpoint {path}: mean = std = 127.5 on 0..255")


def load_segmentation_checkpoint(seg, path: str | Path, format: str = "auto") -> str:
    """Loads a whole released segmentation checkpoint (backbone + decoder) into ``seg`` in place.

    Args:
        seg: a tokred ``Segmenter`` built for the checkpoint's backbone, decoder and ``num_classes``.
        path: ``checkpoint.pth`` (Segmenter authors; ``variant.yml`` beside it is checked when present),
            an mmseg ``.pth`` or a tokred state dict (``.pth`` / ``.safetensors``).
        format: ``"auto"`` (from the key names) or one of ``FORMATS``.

    Returns:
        The format that was loaded.

    Raises:
        FileNotFoundError: no such file.
        ValueError: unknown ``format``; an unreadable, truncated or random file (in tokred's words, naming the
            file); keys matching no format (lists formats and first keys); a ``variant.yml`` that disagrees
            with the model; a checkpoint of another backbone (one summary of every difference and the
            ``model=`` it fits); a tensor whose shape differs (names the tensor, both shapes and the option
            that is likely wrong); checkpoint tensors the model has no place for, or model tensors the
            checkpoint lacks (outside reducer heads).
    """
    path = Path(path)
    sd, fmt = check_segmentation_checkpoint(seg, path, format)
    result = seg.load_state_dict(sd, strict=False)
    kept = [k for k in result.missing_keys if k.startswith("encoder.reducers.")]
    if kept:  # expected for released (unreduced) checkpoints; for a tokred one it may be the wrong file
        (log.warning if fmt == "tokred" else log.info)(
            "checkpoint %s: %d reducer tensors (e.g. %s) are not in it and keep their initial values",
            path, len(kept), kept[0])
    log.info("loaded %s segmentation checkpoint %s", fmt, path)
    return fmt
