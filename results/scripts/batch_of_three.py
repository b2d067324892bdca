"""Issue 12's batch-of-three check: test_vit at 256x320, dCTS (untrained policy, tau 0.5 at every level) then Token
Cropr r=20 (dCTS with the ground-truth oracle policy, so that the counts follow each image's content), on three
images of the embedded CamVid sample that enter block 0 with different token counts: the
logits of the batch of three against the same images one at a time, in the padded and the packed layout.
    python results/scripts/batch_of_three.py
(Before per-image budgets, the issue measured up to 0.385: Cropr's r was clipped to the batch's smallest image.)"""

import itertools

import torch

from tokred import build_segmenter
from tokred.data import build_dataset

CROP = (256, 320)
ds = build_dataset("camvid_sample", None, "train", CROP, train=False)
images = torch.stack([ds[i][0] for i in range(len(ds))])
labels = torch.stack([torch.nn.functional.interpolate(ds[i][1][None, None].float(), size=CROP, mode="nearest")[0, 0]
                      for i in range(len(ds))]).long()
for layout in ("padded", "packed"):
    torch.manual_seed(0)
    seg = build_segmenter("test_vit", 11, CROP, merger="dcts", pruner="cropr", layout=layout,
                          merger_kwargs={"thresholds": [0.5, 0.5, 0.5, 0.5], "target_precision": None,
                                         "policy": "oracle"},
                          pruner_kwargs={"r": 20}).eval()
    with torch.no_grad():
        counts = [int(seg(images[i:i + 1], labels[i:i + 1]).state.tokens_per_block[0][0]) for i in range(len(ds))]
        # three images with three different counts (the first such triple)
        pick = next(t for t in itertools.combinations(range(len(ds)), 3) if len({counts[i] for i in t}) == 3)
        batch, target = images[list(pick)], labels[list(pick)]
        out = seg(batch, target)
        singles = torch.cat([seg(batch[i:i + 1], target[i:i + 1]).logits for i in range(3)])
    diff = (out.logits - singles).abs().max().item()
    print(f"{layout}: images {pick} enter block 0 with {[counts[i] for i in pick]} tokens; tokens entering each "
          f"block (batch): {[t.tolist() for t in out.state.tokens_per_block]}; max |batch - singles| = {diff:.2e}")
