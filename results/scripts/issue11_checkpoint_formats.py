"""Issue 11 closing-note numbers: synthetic Segmenter/mmseg checkpoints loaded; ToMe reference partition vs a plain
loop. Run from the repository root: uv run --frozen python results/scripts/issue11_checkpoint_formats.py"""
import sys, tempfile, pathlib, yaml, torch
sys.path.insert(0, "tests")
import test_checkpoints as tc
import test_tome as tt
from tokred.models.checkpoints import load_segmentation_checkpoint
from tokred.reducers.tome import bipartite_soft_matching
from tokred.state import merge_tokens
d = pathlib.Path(tempfile.mkdtemp())
for fmt in ("segmenter", "mmseg"):
    src = tc._vit_t("mask_transformer", seed=0)
    ckpt = tc._segmenter_layout(src) if fmt == "segmenter" else tc._mmseg_layout(src)
    sub = d / fmt; sub.mkdir()
    if fmt == "segmenter":
        (sub / "variant.yml").write_text(yaml.safe_dump(tc._variant("mask_transformer")))
    torch.save(ckpt, sub / "checkpoint.pth")
    dst = tc._vit_t("mask_transformer", seed=1)
    before = (tc._logits(dst, tc.IMG) - tc._logits(src, tc.IMG)).abs().max().item()
    got = load_segmentation_checkpoint(dst, sub / "checkpoint.pth")
    after = (tc._logits(dst, tc.IMG) - tc._logits(src, tc.IMG)).abs().max().item()
    print(f"{fmt} ViT-T mask-transformer ({len(ckpt.get('state_dict', ckpt.get('model', ckpt)))} keys) detected as {got}: "
          f"max |logits - source| {before:.3g} before loading, {after:.3g} after")
worst = 0.0
for n, r, cls in [(25, 5, True), (26, 12, True), (24, 7, False), (9, 100, True), (197, 16, True), (1025, 100, True)]:
    g = torch.Generator().manual_seed(n + r)
    x, metric = torch.randn(2, n, 64, generator=g), torch.randn(2, n, 16, generator=g)
    size = torch.randint(1, 4, (2, n), generator=g).float(); size[:, 0] = 1.0
    m = bipartite_soft_matching(metric, r, num_protected=int(cls), partition="reference")
    x2, s2 = merge_tokens(x, size, m.assign, m.n_out)
    for b in range(2):
        wx, ws = tt._plain_reference_merge(x[b], metric[b], size[b], r, cls)
        worst = max(worst, (x2[b] - wx).abs().max().item(), (s2[b] - ws).abs().max().item())
print(f"ToMe partition=reference vs the plain loop re-implementation (N up to 1025, r up to 100): max abs diff {worst:.3g}")
