"""README rows of a bench_layouts.sh folder (one row per method, padded and packed side by side):
python results/scripts/readme_layouts_rows.py results/bench/layouts_<model>_1024_b8

Reads the table.csv that layouts_table.py wrote there; prints the markdown table the README shows."""

import json
import sys
from pathlib import Path

import pandas as pd

NAMES = {"none": "none", "dcts": "dCTS", "early_exit": "early exit", "dcts+early_exit": "STEP (dCTS + early exit)",
         "tome": "ToMe", "cropr": "Cropr"}
RS = {"tome": "r", "cropr": "r"}

df = pd.read_csv(Path(sys.argv[1]) / "table.csv")
r_of = {}
for p in Path(sys.argv[1]).glob("*_packed/metrics.json"):
    m = json.loads(p.read_text())
    for k in ("merger", "pruner"):
        cfg = m.get(k) or {}
        if cfg.get("name") in RS and cfg.get("r") is not None:
            r_of[cfg["name"]] = cfg["r"]
print("| method | GFLOPs | GFLOPs ratio | token-blocks | halted | padding waste | speedup padded "
      "| speedup packed (IQR) | efficiency padded | efficiency packed | packed / padded |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for method, g in df.groupby("method", sort=False):
    pad, pk = g[g.layout == "padded"].iloc[0], g[g.layout == "packed"].iloc[0]
    name = NAMES.get(method, method) + (f" r={r_of[method]}" if method in r_of else "")
    print(f"| {name} | {pk['GFLOPs/img']:.0f} | {pk['GFLOPs ratio']:.2f} | {pk['token-blocks']:.3f} | "
          f"{pk['halted']:.2f} | {pk['padding waste']:.2f} | {pad['speedup']:.2f} | {pk['speedup']:.2f} "
          f"({pk['speedup IQR']}) | {pad['efficiency']:.2f} | {pk['efficiency']:.2f} | {pk['vs padded']:.3f} |")
