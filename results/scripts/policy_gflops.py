"""GFLOPs of the dCTS policy CNNs (fvcore) next to the unreduced ViT encoders (analytic), at one input size.

Backs the numbers in tokred/policy/network.py (AUTO_POLICY_BACKBONES) and the README. Run from the repository
root: uv run --frozen python results/scripts/policy_gflops.py [H W]
"""
import sys

import timm
import torch
from fvcore.nn import FlopCountAnalysis

from tokred.measure.flops import analytic_vit_gflops

h, w = (int(v) for v in sys.argv[1:3]) if len(sys.argv) > 2 else (384, 512)
for name in ("mobilenetv3_small_050", "efficientnet_lite0"):
    net = timm.create_model(name, pretrained=False, features_only=True, out_indices=(-1,)).eval()
    flops = FlopCountAnalysis(net, torch.randn(1, 3, h, w))
    flops.unsupported_ops_warnings(False)
    flops.uncalled_modules_warnings(False)
    print(f"policy {name}: {flops.total() / 1e9:.3f} GFLOPs at {h}x{w}")
n0 = (h // 16) * (w // 16)
for vit, dim, depth in (("ViT-T", 192, 12), ("ViT-S", 384, 12), ("ViT-B", 768, 12)):
    gflops = analytic_vit_gflops(dim, depth, n0 + 1, num_patches=n0)
    print(f"{vit}/16 encoder (analytic, {n0} + 1 tokens): {gflops:.2f} GFLOPs")
