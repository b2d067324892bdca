"""Token reduction of dCTS at ViT-L/16 1024x1024 on CamVid test images (upsampled), trained policy and oracle.
Only the embedding stage runs (policy + quadtree + supertoken embedding): the token count does not depend on
the ViT blocks."""
import torch, torch.nn.functional as F
from tokred import build_segmenter
from tokred.data import build_dataset
from tokred.encoder import EmbedContext
torch.set_num_threads(1)
ds = build_dataset("camvid", "../shared/data/CamVid", "test", (1024, 1024), train=False)
idx = list(range(0, len(ds), len(ds) // 16))[:16]
imgs = torch.stack([ds[i][0] for i in idx])
labels = torch.stack([F.interpolate(ds[i][1][None, None].float(), size=(1024, 1024), mode="nearest")[0, 0].long() for i in idx])
P = "results/cache/policy/camvid_384x512_efficientnet_lite0_L2-4-8-16.safetensors"
for name, kw in [("dcts trained policy, tau=0.5", {"policy_checkpoint": P}),
                 ("dcts trained policy, tau=0.8", {"policy_checkpoint": P, "thresholds": [0.8] * 4}),
                 ("dcts oracle policy, tau=0.5", {"policy": "oracle"})]:
    seg = build_segmenter("vit_large", 11, (1024, 1024), merger="dcts", merger_kwargs=kw).eval()
    enc = seg.encoder
    with torch.inference_mode():
        counts = torch.cat([enc.reducers[0].embed(EmbedContext(imgs[i:i + 4], labels[i:i + 4], enc))[1].live_patch_tokens()
                            for i in range(0, len(idx), 4)])
    print(f"{name}: N0=4096, tokens mean {counts.float().mean():.0f} (min {counts.min()}, max {counts.max()}), "
          f"token reduction {4096 / counts.float().mean():.2f}x over {len(idx)} test images")
