"""GFLOPs of the whole segmenter with fvcore, one image at a time, attention included (methods.md Sec. 8).

The field reports fvcore ``FlopCountAnalysis`` numbers, in which one multiply-add counts as one "flop", and
averages them over validation images when the token count depends on the image (dynamic reducers). tokred
follows that convention with two corrections the peers' numbers need:

* fvcore has no handle for ``aten::scaled_dot_product_attention``; without one the ``q k^T`` and
  ``attn v`` products, a large share of the cost at high resolution, silently go missing. ``sdpa_flop_jit``
  counts them (``B * h * Nq * Nk * (hd + hd_v)`` multiply-adds; the additive mask and softmax are
  elementwise and, as in fvcore, not counted).
* every image is traced on its own (batch 1), so padding slots that a batch needs when images keep
  different token counts are never counted, and each image's own control flow (halting, pruning) is what
  gets traced.

Everything the forward runs is counted: patch embedding, blocks, every reducer's own work (policy networks,
auxiliary heads, matching), restore, decoder and the final upsampling. Ops that run directly inside a
reducer's hook methods are attributed to that reducer by calling the hook through the reducer module while
tracing (fvcore scopes ops by module calls); see ``_reducer_scopes``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from tokred.io import eval_mode

with warnings.catch_warnings():  # fvcore's import scripts a helper; recent torch flags torch.jit as deprecated
    warnings.simplefilter("ignore", FutureWarning)
    from fvcore.nn import FlopCountAnalysis
    from fvcore.nn.jit_handles import Handle, get_shape

__all__ = [
    "FLOP_CONVENTION", "EXTRA_HANDLES", "analytic_vit_gflops", "combine_gflops", "count_gflops",
    "sdpa_flop_jit",
]

log = logging.getLogger(__name__)

FLOP_CONVENTION = ("fvcore: one multiply-add counted as one flop; GFLOPs = 1e9 multiply-adds per image; "
                   "attention (scaled_dot_product_attention) included; elementwise ops not counted")

_HOOKS = ("embed", "on_embed", "on_block_start", "on_attention", "on_block", "on_final")


# ---------------------------------------------------------------------------------------------- op handles
def sdpa_flop_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """fvcore handle for ``aten::scaled_dot_product_attention``: ``q k^T`` plus ``attn v`` multiply-adds.

    Query ``[B, h, Nq, hd]``, key ``[B, h, Nk, hd]``, value ``[B, h, Nk, hd_v]`` (any leading batch dims):
    ``prod(leading) * Nq * Nk * (hd + hd_v)`` multiply-adds, i.e. ``2 * B * h * Nq * Nk * hd`` when
    ``hd_v == hd``. The mask/bias addition and the softmax are elementwise and not counted (fvcore convention).
    Grouped-query attention (fewer key heads) costs the same per query head and is counted per query head.
    """
    q, k, v = (get_shape(inputs[i]) for i in range(3))
    if q is None or k is None or v is None:
        raise ValueError("scaled_dot_product_attention traced without complete shapes; trace with real tensors")
    *lead, n_q, hd = q
    n_k, hd_v = k[-2], v[-1]
    return math.prod(lead) * n_q * n_k * (hd + hd_v)


def _matmul_flop_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """``aten::matmul`` with ``torch.matmul`` semantics: 1-D operands and broadcast batch dims.

    ``[..., n, k] @ [..., k, m]`` costs ``prod(broadcast batch) * n * k * m`` multiply-adds; a 1-D left operand
    is ``[1, k]`` and a 1-D right operand ``[k, 1]``. (fvcore's own handle rejects 1-D operands, e.g. a score
    ``[B, N, C] @ [C]``, and ignores batch dims that only the right operand has.)
    """
    a, b = get_shape(inputs[0]), get_shape(inputs[1])
    a = [1, *a] if len(a) == 1 else a
    b = [*b, 1] if len(b) == 1 else b
    batch = torch.broadcast_shapes(torch.Size(a[:-2]), torch.Size(b[:-2]))
    return math.prod(batch) * a[-2] * a[-1] * b[-1]


def _baddbmm_flop_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """``aten::baddbmm(input, b1 [B, n, k], b2 [B, k, m])``: ``B * n * k * m`` multiply-adds."""
    b1, b2 = get_shape(inputs[1]), get_shape(inputs[2])
    return b1[0] * b1[1] * b1[2] * b2[2]


def _cdist_flop_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """``aten::cdist(x1 [..., n, d], x2 [..., m, d])``: ``prod(...) * n * m * d`` (one multiply-add per term)."""
    x1, x2 = get_shape(inputs[0]), get_shape(inputs[1])
    return math.prod(x1[:-2]) * x1[-2] * x2[-2] * x1[-1]


#: Handles tokred adds to fvcore's defaults or replaces them with (op name -> handle).
#: ``aten::_scaled_dot_product_*`` variants appear only when a backend kernel is called directly; a traced
#: ``F.scaled_dot_product_attention`` records the composite op.
EXTRA_HANDLES: dict[str, Handle] = {
    "aten::scaled_dot_product_attention": sdpa_flop_jit,
    "aten::_scaled_dot_product_flash_attention_for_cpu": sdpa_flop_jit,
    "aten::_scaled_dot_product_efficient_attention": sdpa_flop_jit,
    "aten::_scaled_dot_product_flash_attention": sdpa_flop_jit,
    "aten::matmul": _matmul_flop_jit,
    "aten::baddbmm": _baddbmm_flop_jit,
    "aten::cdist": _cdist_flop_jit,
}


# ---------------------------------------------------------------------------------------------- tracing
class _LogitsOnly(nn.Module):
    """Wraps a segmenter so the traced output is a tensor (``SegOutput.logits [B, K, H, W]``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: Tensor, target: Tensor | None = None) -> Tensor:
        out = self.model(image, target)
        return out.logits if hasattr(out, "logits") else out


def _dispatcher(reducer: nn.Module) -> Any:
    def forward(hook: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(type(reducer), hook)(reducer, *args, **kwargs)

    return forward


def _scoped_hook(reducer: nn.Module, hook: str) -> Any:
    def call(*args: Any, **kwargs: Any) -> Any:
        return reducer(hook, *args, **kwargs)

    return call


@contextlib.contextmanager
def _reducer_scopes(model: nn.Module) -> Iterator[list[tuple[str, nn.Module]]]:
    """Routes every reducer hook through the reducer's own ``__call__`` while counting.

    fvcore attributes an op to the innermost module whose ``__call__`` is running. Hook methods are plain
    method calls, so the maths a hook does itself (ToMe's similarity matmul) would otherwise land on the
    encoder. Inside this context each hook is replaced, on the instance only, by a call of the reducer module
    that dispatches to the class's hook; everything is restored on exit.

    Yields:
        ``[(name, reducer)]``: reducers found (``model.encoder.reducers``), named by registry name or class.
    """
    reducers = list(getattr(getattr(model, "encoder", None), "reducers", []) or [])
    patched: list[tuple[nn.Module, list[str]]] = []
    names: list[tuple[str, nn.Module]] = []
    try:
        for r in reducers:
            base = getattr(r, "registry_name", None) or type(r).__name__
            name = base if base not in {n for n, _ in names} else f"{base}_{len(names)}"
            names.append((name, r))
            set_attrs = ["forward"] + [h for h in _HOOKS if hasattr(type(r), h)]
            if "forward" in vars(r):
                raise RuntimeError(f"reducer {name} already has an instance-level forward; cannot scope its hooks")

            r.forward = _dispatcher(r)  # type: ignore[method-assign]
            for h in set_attrs[1:]:
                setattr(r, h, _scoped_hook(r, h))
            patched.append((r, set_attrs))
        yield names
    finally:
        for r, attrs in patched:
            for a in attrs:
                vars(r).pop(a, None)


# Ops whose Python ``bool`` scalar argument the jit tracer cannot record (see _TraceSafeBoolScalars), by name
# (torch function and Tensor method alike; the input/self is argument 0 in both).
# Fill values: name -> (position, keyword); the result dtype comes from ``dtype`` or the input, never the value.
_FILL_ARGS: dict[str, tuple[int, str]] = {
    "full_like": (1, "fill_value"), "new_full": (2, "fill_value"), "masked_fill": (2, "value"),
    "masked_fill_": (2, "value"), "fill_": (1, "value"), "fill": (1, "value"), "scatter": (3, "value"),
    "scatter_": (3, "value"), "index_fill": (3, "value"), "index_fill_": (3, "value"),
}
# Operands that may be tensors: a bool becomes a 0-dim bool tensor (same type promotion as a Python scalar).
_OPERAND_OPS = frozenset({
    "where", "eq", "ne", "__eq__", "__ne__", "__and__", "__or__", "__xor__", "__rand__", "__ror__", "__rxor__",
    "__iand__", "__ior__", "__ixor__", "bitwise_and", "bitwise_or", "bitwise_xor", "bitwise_and_", "bitwise_or_",
    "bitwise_xor_", "logical_and", "logical_or", "logical_xor",
})


class _TraceSafeBoolScalars(TorchFunctionMode):
    """Rewrites Python ``bool`` scalars that ``torch.jit`` tracing cannot record, with identical results.

    The tracer records a Python ``bool`` scalar argument as a ``bool`` constant that alias analysis cannot
    match to a ``Scalar`` (an internal assert, "We don't have an op for aten::full but it isn't a special
    case", pytorch issue 130229); ``TokenState`` and reducers use such calls (``torch.full(..., True)``,
    ``scatter(1, idx, True)``, ``mask == True``). While counting:

    * fill values (``full``, ``full_like``, ``new_full``, ``masked_fill``, ``fill_``, ``scatter``,
      ``index_fill``) become ``int``: the output dtype comes from ``dtype`` or the input tensor, and
      ``torch.full`` without ``dtype`` gets ``dtype=torch.bool``, as the bool fill implied;
    * operands of ``where``, comparisons and bitwise/logical ops become 0-dim bool tensors, which promote
      exactly like a Python scalar.

    Other ops with bool scalars (rare) still fail to trace; the error then comes from ``torch.jit``.
    """

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = getattr(func, "__name__", "")
        if name == "full" or name in _FILL_ARGS or name in _OPERAND_OPS:
            args, kwargs = self._rewrite(name, list(args), dict(kwargs or {}))
        return func(*args, **(kwargs or {}))

    @staticmethod
    def _rewrite(name: str, args: list[Any], kwargs: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
        if name == "full":
            if len(args) > 1 and isinstance(args[1], bool) or isinstance(kwargs.get("fill_value"), bool):
                if len(args) > 1:
                    args[1] = int(args[1])
                else:
                    kwargs["fill_value"] = int(kwargs["fill_value"])
                if kwargs.get("dtype") is None:
                    kwargs["dtype"] = torch.bool
        elif name in _FILL_ARGS:
            pos, key = _FILL_ARGS[name]
            if len(args) > pos and isinstance(args[pos], bool):
                args[pos] = int(args[pos])
            elif isinstance(kwargs.get(key), bool):
                kwargs[key] = int(kwargs[key])
        else:
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
            if tensors:
                dev = tensors[0].device
                args = [torch.tensor(a, device=dev) if isinstance(a, bool) else a for a in args]
                kwargs = {k: torch.tensor(v, device=dev) if isinstance(v, bool) else v for k, v in kwargs.items()}
        return args, kwargs


def _count_one(wrapped: nn.Module, inputs: tuple[Tensor, ...], handles: Mapping[str, Handle | None],
               reducer_names: list[tuple[str, nn.Module]]) -> dict[str, Any]:
    """fvcore analysis of one traced forward; returns flops by part, by operator and skipped ops."""
    fca = FlopCountAnalysis(wrapped, inputs)
    fca.set_op_handle(**dict(handles))
    fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    by_module = fca.by_module()
    total = fca.total()
    reducer_flops = {name: by_module.get(f"model.encoder.reducers.{i}", 0) for i, (name, _) in
                     enumerate(reducer_names)}
    red = sum(reducer_flops.values())
    encoder = by_module.get("model.encoder", 0) - red
    decoder = by_module.get("model.decoder", 0)
    return {
        "total": total,
        "parts": {"encoder": encoder, "reducers": red, "decoder": decoder, "other": total - encoder - red - decoder},
        "reducers": reducer_flops,
        "operators": dict(fca.by_operator()),
        "skipped": dict(fca.unsupported_ops()),
    }


def count_gflops(model: nn.Module, images: Tensor, targets: Tensor | None = None,
                 handles: Mapping[str, Handle | None] | None = None) -> dict[str, Any]:
    """Counts GFLOPs of a whole segmenter forward per image with fvcore (methods.md Sec. 8).

    Every image is traced separately at batch 1 with its real token counts (dynamic reducers take their own
    path per image); the result averages over images. The model is put in eval mode for the count (restored
    afterwards) and run under ``torch.no_grad``; Python ``bool`` scalars, which the jit tracer cannot record
    (``torch.full(..., True)``, ``scatter(..., True)``), are rewritten to equivalent calls while tracing
    (``_TraceSafeBoolScalars``). Cost: one jit trace per image (about 0.1-1 s on CPU for small models), so count
    on a subset of validation images.

    Args:
        model: a ``Segmenter`` (or any module whose output is a tensor or has ``.logits``); reducers are found
            at ``model.encoder.reducers``.
        images: ``[B, 3, H, W]`` normalised images on the model's device (H, W px multiples of the patch size),
            e.g. validation images.
        targets: optional ``[B, H, W]`` labels, passed to the forward (oracle policies read them).
        handles: fvcore op handles to add or override (op name -> handle; None ignores the op), applied after
            fvcore's defaults and ``EXTRA_HANDLES``.

    Returns:
        JSON-serialisable dict (GFLOPs per image, 1 GFLOP = 1e9 multiply-adds):
        ``gflops`` (mean), ``gflops_min``, ``gflops_max``, ``gflops_std``, ``per_image`` (list),
        ``num_images``, ``image_hw`` ([H, W] px), ``by_module`` (mean GFLOPs of ``encoder`` (patch embedding,
        blocks, attention, final norm), ``reducers`` (all reducer-owned ops), ``decoder``, ``other`` (restore,
        upsampling): they sum to ``gflops``), ``by_reducer`` (mean GFLOPs per reducer name),
        ``by_operator`` (mean GFLOPs per op kind), ``skipped_ops`` (op name -> occurrences per image, ops with no
        handle, i.e. not counted: elementwise ops mostly), ``flop_convention``.

    Raises:
        ValueError: ``images`` is not ``[B, 3, H, W]`` with B >= 1, or ``targets`` does not match B.
    """
    if images.dim() != 4 or images.shape[0] < 1:
        raise ValueError(f"images must be [B, 3, H, W] with B >= 1, got shape {tuple(images.shape)}")
    if targets is not None and targets.shape[0] != images.shape[0]:
        raise ValueError(f"targets has {targets.shape[0]} images but images has {images.shape[0]}")
    all_handles: dict[str, Handle | None] = dict(EXTRA_HANDLES)
    all_handles.update(handles or {})
    wrapped = _LogitsOnly(model)
    per_image: list[dict[str, Any]] = []
    fv_log = logging.getLogger("fvcore")
    old_level = fv_log.level
    fv_log.setLevel(logging.ERROR)
    try:
        with eval_mode(model), torch.no_grad(), _reducer_scopes(model) as names, _TraceSafeBoolScalars(), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")  # jit tracer / deprecation chatter; skipped ops are reported below
            for b in range(images.shape[0]):
                inputs = (images[b:b + 1],) if targets is None else (images[b:b + 1], targets[b:b + 1])
                per_image.append(_count_one(wrapped, inputs, all_handles, names))
    finally:
        fv_log.setLevel(old_level)
    out = _summarise(per_image, [int(images.shape[-2]), int(images.shape[-1])])
    log.debug("counted %.4f GFLOPs/image over %d images; not counted (no handle): %s", out["gflops"],
              out["num_images"], out["skipped_ops"])
    return out


def count_gflops_windows(model: nn.Module, images: Sequence[Tensor], mode: str = "whole",
                         crop: tuple[int, int] | None = None, stride: tuple[int, int] | None = None,
                         targets: Sequence[Tensor] | None = None,
                         handles: Mapping[str, Handle | None] | None = None) -> dict[str, Any]:
    """GFLOPs per image under an evaluation protocol: whole-image or sliding-window inference.

    Each image is split exactly as ``tokred.engine.evaluate.segment_images`` splits it (whole: padded to a
    multiple of patch_size; slide: windows of ``crop`` px every ``stride`` px, padded up to the window where
    smaller) and every window is traced on its own at batch 1 with its own token counts. The GFLOPs of an image
    are the SUM over its windows (what segmenting that image costs); the result averages over images and
    reports how many windows each image took. The averaging of logits in overlaps is elementwise and not
    counted.

    Args:
        model: a ``Segmenter``.
        images: ``[3, H_i, W_i]`` normalised images at the protocol's resolution (sizes may differ).
        mode: ``"whole"`` or ``"slide"``.
        crop / stride: ``(H, W)`` px window and step of slide mode (stride None = 2/3 of the window).
        targets: optional ``[h_i, w_i]`` labels (oracle policies); resized (nearest) and cut like the image.
        handles: extra fvcore op handles, as in :func:`count_gflops`.

    Returns:
        The keys of :func:`count_gflops` with per-image numbers summed over windows (``per_image``,
        ``by_module``, ...), ``image_hw`` (the distinct input sizes [H, W] px, or one), plus ``windows`` (list:
        windows per image) and ``windows_per_image`` (their mean; 1.0 in whole mode).

    Raises:
        ValueError: no images, unknown mode, slide without ``crop``, or ``targets`` not one per image.
    """
    from tokred.engine.evaluate import forward_inputs

    if not len(images):
        raise ValueError("count_gflops_windows needs at least one image")
    if targets is not None and len(targets) != len(images):
        raise ValueError(f"{len(targets)} targets for {len(images)} images")
    per_image: list[dict[str, Any]] = []
    windows: list[int] = []
    sizes = set()
    for i, image in enumerate(images):
        pairs = forward_inputs(model, image, mode, crop, stride, None if targets is None else targets[i])
        batch = torch.stack([x for x, _ in pairs])
        lbl = None if targets is None else torch.stack([t for _, t in pairs]).long()
        res = count_gflops(model, batch, lbl, handles)  # every window traced alone at batch 1
        n = res["num_images"]  # windows of this image: means * n = sums over its windows
        sizes.add((int(image.shape[-2]), int(image.shape[-1])))
        windows.append(len(pairs))
        per_image.append({"total": sum(res["per_image"]) * 1e9,
                          **{key: {k: v * n * 1e9 for k, v in res[src].items()} for key, src in
                             (("parts", "by_module"), ("reducers", "by_reducer"), ("operators", "by_operator"))},
                          "skipped": {k: v * n for k, v in res["skipped_ops"].items()}})
    distinct = sorted(sizes)
    out = _summarise(per_image, list(distinct[0]) if len(distinct) == 1 else [list(s) for s in distinct])
    out["windows"] = windows
    out["windows_per_image"] = sum(windows) / len(windows)
    return out


def _summarise(per_image: list[dict[str, Any]], image_hw: list[int]) -> dict[str, Any]:
    n = len(per_image)

    def mean_of(key: str) -> dict[str, float]:
        acc: Counter[str] = Counter()
        for r in per_image:
            acc.update({k: v / 1e9 for k, v in r[key].items()})
        return {k: v / n for k, v in sorted(acc.items())}

    skipped: Counter[str] = Counter()
    for r in per_image:
        skipped.update(r["skipped"])
    out = _with_stats([r["total"] / 1e9 for r in per_image])
    out.update({
        "image_hw": image_hw, "by_module": mean_of("parts"), "by_reducer": mean_of("reducers"),
        "by_operator": mean_of("operators"), "skipped_ops": {k: v / n for k, v in sorted(skipped.items())},
        "flop_convention": FLOP_CONVENTION,
    })
    return out


def _with_stats(per_image: list[float]) -> dict[str, Any]:
    t = torch.tensor(per_image, dtype=torch.float64)
    return {"gflops": t.mean().item(), "gflops_min": t.min().item(), "gflops_max": t.max().item(),
            "gflops_std": t.std(unbiased=False).item(), "per_image": list(per_image), "num_images": len(per_image)}


def combine_gflops(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Merges several ``count_gflops`` results (e.g. one per validation batch) into one.

    Statistics are recomputed from the concatenated ``per_image`` lists; breakdowns are averaged weighted by
    ``num_images``. ``image_hw`` becomes a list of the distinct sizes when they differ.

    Args:
        results: outputs of ``count_gflops``.

    Returns:
        A dict with the same keys as ``count_gflops``.

    Raises:
        ValueError: ``results`` is empty.
    """
    if not results:
        raise ValueError("combine_gflops needs at least one count_gflops result")
    out = _with_stats([g for r in results for g in r["per_image"]])
    total = out["num_images"]
    for key in ("by_module", "by_reducer", "by_operator", "skipped_ops"):
        acc: Counter[str] = Counter()
        for r in results:
            acc.update({k: v * r["num_images"] / total for k, v in r[key].items()})
        out[key] = dict(sorted(acc.items()))
    sizes: set[tuple[int, int]] = set()
    for r in results:  # image_hw is [H, W], or a list of [H, W] after an earlier combine
        hw = r["image_hw"]
        sizes.update([tuple(hw)] if isinstance(hw[0], int) else [tuple(s) for s in hw])
    sizes = sorted(sizes)
    out["image_hw"] = list(sizes[0]) if len(sizes) == 1 else [list(s) for s in sizes]
    out["flop_convention"] = FLOP_CONVENTION
    return out


def analytic_vit_gflops(embed_dim: int, depth: int, num_tokens: int | Sequence[int], mlp_ratio: float = 4.0,
                        patch_size: int = 16, in_chans: int = 3, num_patches: int | None = None) -> float:
    """Analytic multiply-adds of a plain ViT encoder, in GFLOPs (methods.md Sec. 8 check).

    Per block of ``N`` tokens of width ``d``: qkv ``3 N d^2`` + projection ``N d^2`` + MLP
    ``2 * mlp_ratio * N d^2`` (``12 N d^2`` for mlp_ratio 4) + attention ``q k^T`` and ``attn v``
    ``2 N^2 d``; plus the patch embedding ``N0 * in_chans * patch_size^2 * d``. Norms, biases, softmax and
    other elementwise ops are not included (they are small against ``d``).

    Args:
        embed_dim: ``d``.
        depth: number of blocks.
        num_tokens: tokens entering every block (prefix tokens included), or one count per block
            (length ``depth``) for a reduced model.
        mlp_ratio: MLP hidden width / ``d``.
        patch_size: px (square patches).
        in_chans: input channels.
        num_patches: ``N0`` patches embedded (default: ``num_tokens`` of the first block).

    Returns:
        GFLOPs (1e9 multiply-adds) of one image.

    Raises:
        ValueError: ``num_tokens`` given per block with a length other than ``depth``.
    """
    per_block = [int(num_tokens)] * depth if isinstance(num_tokens, (int, float)) else [int(n) for n in num_tokens]
    if len(per_block) != depth:
        raise ValueError(f"num_tokens has {len(per_block)} entries for depth {depth}; give one per block")
    d = embed_dim
    blocks = sum((4 + 2 * mlp_ratio) * n * d * d + 2 * n * n * d for n in per_block)
    n0 = per_block[0] if num_patches is None else num_patches
    embed = n0 * in_chans * patch_size * patch_size * d
    return (blocks + embed) / 1e9
