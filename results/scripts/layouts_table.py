"""Table of a bench_layouts.sh folder: python results/scripts/layouts_table.py results/bench/layouts_<model>_1024_b8

Reads every <method>_<layout>/metrics.json written by ``python -m tokred bench bench.layouts=[padded,packed]`` and
writes table.md and table.csv next to them (pandas); prints the markdown."""

import json
import sys
from pathlib import Path

import pandas as pd

root = Path(sys.argv[1])
rows = []
for p in sorted(root.glob("*/metrics.json")):
    m = json.loads(p.read_text())
    t = m["throughput_detail"]
    rows.append({
        "method": m["method"], "layout": m["layout"], "GFLOPs/img": m["gflops"], "GFLOPs ratio": m["gflops_ratio"],
        "im/s": m["images_per_second"], "unreduced im/s": m["reference_images_per_second"],
        "speedup": m["speedup"], "speedup IQR": "{:.3f}-{:.3f}".format(*t["speedup_iqr"]),
        "efficiency": m["efficiency"], "vs padded": m.get("layout_speedup"), "padding waste": m["padding_waste"],
        "token-blocks": m.get("token_block_fraction"), "halted": m.get("halted_fraction"),
        "repeats": t["reduced"]["repeats"], "batch": m["bench"]["batch_size"], "warmup": m["bench"]["warmup"],
        "threads": t["reduced"]["threads"], "device": m["device"],
        "torch": t["reduced"]["torch_version"], "folder": p.parent.name})
df = pd.DataFrame(rows)
order = {k: i for i, k in enumerate(["none", "dcts", "early_exit", "dcts+early_exit", "tome", "cropr"])}
df = df.sort_values(["method", "layout"], key=lambda s: s.map(order) if s.name == "method" else s,
                    kind="stable").reset_index(drop=True)
df.to_csv(root / "table.csv", index=False)
cols = ["method", "layout", "GFLOPs/img", "GFLOPs ratio", "im/s", "speedup", "speedup IQR", "efficiency",
        "vs padded", "padding waste", "token-blocks", "halted"]
md = df[cols].to_markdown(index=False, floatfmt=".3g")
r0 = df.iloc[0]
hw = (f"{r0['device']}, {r0['threads']} threads, torch {r0['torch']}, fp32, batch {r0['batch']}, "
      f"{r0['repeats']} timed repeats per model (ABC CBA), {r0['warmup']} warm-up")
(root / "table.md").write_text(md + "\n\n" + hw + "\n")
print(md)
print(hw)
