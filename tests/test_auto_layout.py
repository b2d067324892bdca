"""``encoder.layout=auto``: a block runs packed only when padding inflates it enough and the images hold enough
tokens for the per-image kernels to pay (tokred.encoder AUTO_MIN_PADDING_WASTE, AUTO_MIN_MEAN_TOKENS)."""

import dataclasses

import torch

from tokred.encoder import AUTO_MIN_MEAN_TOKENS, AUTO_MIN_PADDING_WASTE
from tokred.models.segmenter import build_segmenter
from tokred.state import TokenState


def _state(counts, n):
    """A state of len(counts) images padded to n slots, image b holding counts[b] live tokens."""
    st = TokenState.initial(len(counts), (1, n), 0, torch.device("cpu"))
    valid = torch.arange(n)[None, :] < torch.tensor(counts)[:, None]  # [B, N]
    return dataclasses.replace(st, valid=valid)


def _decision(layout, counts, n):
    enc = build_segmenter("test_vit", num_classes=3, crop_size=(64, 64)).encoder
    enc.layout = layout
    return enc._packable() and enc._pack_layout(_state(counts, n), None) is not None


def test_auto_packs_only_with_enough_padding_and_enough_tokens():
    n = 1000
    big_waste = [n, n // 2]  # waste 1000 / 750 = 1.33, mean 750 tokens
    assert _decision("auto", big_waste, n)
    little = [n, int(n / AUTO_MIN_PADDING_WASTE) + 40]  # mean tokens above the limit, waste below 1.05
    assert n * 2 / sum(little) < AUTO_MIN_PADDING_WASTE
    assert not _decision("auto", little, n)
    few = [AUTO_MIN_MEAN_TOKENS // 2, AUTO_MIN_MEAN_TOKENS // 4]  # waste 1.33 but few tokens per image
    assert not _decision("auto", few, AUTO_MIN_MEAN_TOKENS // 2)
    assert _decision("packed", few, AUTO_MIN_MEAN_TOKENS // 2)  # forced packing ignores both limits
    assert not _decision("padded", big_waste, n)
