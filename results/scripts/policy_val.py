"""Per-level precision/recall of the trained CamVid policies on the val split (python results/scripts/policy_val.py)."""
import torch
from torch.utils.data import DataLoader
from tokred.data import build_dataset
from tokred.policy import build_policy
from tokred.policy.train import _collate, evaluate_policy

torch.set_num_threads(1)
val = build_dataset("camvid", "../shared/data/CamVid", "val", (384, 512), train=False)
loader = DataLoader(val, batch_size=8, collate_fn=_collate)
for levels, name in [((2, 4, 8, 16), "L2-4-8-16"), ((2,), "L2")]:
    pol = build_policy(levels, 16, "efficientnet_lite0",
                       checkpoint=f"results/cache/policy/camvid_384x512_efficientnet_lite0_{name}.safetensors")
    res = evaluate_policy(pol, loader, {lv: 0.5 for lv in levels}, torch.device("cpu"))
    print(name, {k: round(v, 3) if isinstance(v, float) else v for k, v in res.items()})
