import torch

from tokred.engine.sampler import ResumableSampler, SeededDataset


def test_sampler_deterministic_offset_and_world_union():
    one = list(ResumableSampler(10, 4, seed=3))
    assert one == list(ResumableSampler(10, 4, seed=3)) and len(one) == 8
    s = ResumableSampler(10, 4, seed=3)
    s.set_epoch(1)
    assert list(s) != one
    s.set_epoch(0, offset=5)
    assert list(s) == one[5:]
    ranks = [list(ResumableSampler(10, 2, seed=3, rank=r, world_size=2)) for r in range(2)]
    for b in range(2):
        union = set(ranks[0][2 * b:2 * b + 2]) | set(ranks[1][2 * b:2 * b + 2])
        assert union == set(one[4 * b:4 * b + 4])


class _Rand(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return torch.rand(2)


def test_seeded_dataset_isolated_from_global_rng():
    ds = SeededDataset(_Rand())
    torch.manual_seed(0)
    a = ds[(1, 7)]
    before = torch.rand(1)
    torch.manual_seed(0)
    b = ds[(1, 7)]
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(torch.rand(1), before)
