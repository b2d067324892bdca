"""Resumable, worker-count-independent training order (issue 15, exact resume).

``tokred.jobs.train_stage`` trains through :class:`ResumableSampler` and :class:`SeededDataset`: the batches of
epoch ``e`` and every augmentation drawn for them depend only on ``(seed, e)``, never on the global random
generators, the number of data-loader workers or how often the run was interrupted.
"""
from __future__ import annotations

import torch


class ResumableSampler(torch.utils.data.Sampler):
    """Yields ``(index, sample_seed)`` pairs for one rank; the order depends only on ``(seed, epoch)``.

    The permutation of ``range(n)`` is drawn from a private ``torch.Generator`` seeded from ``(seed, epoch)``,
    truncated to whole global batches (``batch_size * world_size``), and rank ``r`` takes ``perm[r::world_size]``,
    so the union of the ranks' batch ``i`` equals the single-process batch ``i`` of size ``batch_size * world_size``.

    Args:
        n: dataset length (samples).
        batch_size: per-rank batch size (samples).
        seed: run seed.
        rank: this process's rank.
        world_size: number of processes.

    Raises:
        ValueError: when the dataset holds fewer samples than one global batch, or rank is out of range.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, {world_size}): pass the process's rank and world size")
        if n < batch_size * world_size:
            raise ValueError(f"{n} samples is fewer than one global batch ({batch_size} x {world_size}): "
                             "lower train.batch_size or use more data")
        self.n, self.batch_size, self.seed, self.rank, self.world_size = n, batch_size, seed, rank, world_size
        self.epoch, self.offset = 0, 0

    def set_epoch(self, epoch: int, offset: int = 0) -> None:
        """Select the epoch and skip the first ``offset`` of this rank's samples (mid-epoch resume)."""
        self.epoch, self.offset = epoch, offset

    def _kept(self) -> int:
        """Samples of the epoch across all ranks: whole global batches only."""
        step = self.batch_size * self.world_size
        return self.n // step * step

    def _global_order(self) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g)
        seeds = torch.randint(0, 2**62, (self.n,), generator=g)
        return perm[:self._kept()], seeds[:self._kept()]

    def __len__(self) -> int:
        return self._kept() // self.world_size - self.offset

    @property
    def batches_per_epoch(self) -> int:
        """Batches of ``batch_size`` this rank takes in a whole epoch (ignoring ``offset``)."""
        return self._kept() // self.world_size // self.batch_size

    def __iter__(self):
        perm, seeds = self._global_order()
        mine = slice(self.rank, None, self.world_size)
        for i, s in list(zip(perm[mine].tolist(), seeds[mine].tolist()))[self.offset:]:
            yield i, s


class SeededDataset(torch.utils.data.Dataset):
    """Wraps a dataset so ``ds[(index, sample_seed)]`` draws its augmentation from ``sample_seed`` only.

    The global torch RNG is forked, so neither the worker count nor the model's randomness changes the data.
    """

    def __init__(self, ds):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key):
        index, sample_seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed)
            return self.ds[index]
