"""Confidence (max softmax) of the untrained early-exit heads on one CamVid test image at 1024x1024, per exit:
the p0 that bench_layouts.sh uses is the 60th percentile of the last exit's confidences, so that about 40% of
the tokens halt there (STEP's "up to 40% halted").

    uv run --frozen python results/scripts/exit_confidence.py [vit_base|vit_large]

The model is built exactly as ``python -m tokred bench`` builds it (same config composition and seed), so the
heads are the ones the bench times.
"""

import os
import sys

import torch
from hydra import compose, initialize_config_dir

from tokred.config import build_datasets, build_model_from_config, eval_images, seed_everything
from tokred.reducers.early_exit import LinearExitHead

model_name = sys.argv[1] if len(sys.argv) > 1 else "vit_base"
with initialize_config_dir(config_dir=os.path.abspath("configs"), version_base=None):
    cfg = compose("config", overrides=[f"model={model_name}", "dataset=camvid", "dataset.root=../shared/data/CamVid",
                                       "dataset.crop_size=[1024,1024]", "dataset.base_size=[1024,1024]",
                                       "pruner=early_exit", "pruner.threshold=0.999", "pruner.top_k=5",
                                       "pruner.target_accuracy=null"])
seed_everything(int(cfg.seed))
model = build_model_from_config(cfg).eval()
imgs = eval_images(build_datasets(cfg, train=False), 1, (1024, 1024))
conf: dict[str, list[torch.Tensor]] = {}
for n, m in model.named_modules():
    if isinstance(m, LinearExitHead):
        m.register_forward_hook(lambda mod, i, o, n=n: conf.setdefault(n, []).append(o.softmax(-1).amax(-1).flatten()))
with torch.inference_mode():
    model(imgs)
qs = (0.1, 0.5, 0.6, 0.7, 0.9)
for n, v in conf.items():
    c = torch.cat(v)
    print(n, f"{c.numel()} tokens, quantiles {qs}:", [round(float(c.quantile(q)), 4) for q in qs])
last = torch.cat(conf[list(conf)[-1]])
print(f"{model_name}: p0 = {float(last.quantile(0.6)):.3f} (60th percentile of the last exit)")
