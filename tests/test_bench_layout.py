"""``python -m tokred bench bench.reference=padded``: the packed layout timed against the same model padded."""

import json


def test_bench_packed_against_padded_records_layout_and_padding_waste(tmp_path, tokred_cli):
    res = tokred_cli("bench", "experiment=smoke", "merger=dcts", "pruner=early_exit", "pruner.threshold=0.05",
                     "dataset.crop_size=[128,160]", "dataset.base_size=[128,160]", "merger.levels=[2,4,8]",
                     "merger.thresholds=[0.5,0.5,0.5]", "bench.reference=padded", "bench.batch_size=2",
                     "bench.repeats=2", "bench.warmup=1", "bench.flops_images=2", f"bench.output_dir={tmp_path}")
    assert res.returncode == 0, res.stderr[-3000:]
    (out,) = list(tmp_path.glob("*/metrics.json"))
    m = json.loads(out.read_text())
    assert m["layout"] == "packed" and m["reference"] == "padded"
    assert m["padding_waste"] >= 1.0 and m["gflops_ratio"] == 1.0  # the same model: equal GFLOPs
    assert m["speedup"] > 0 and len(m["throughput_detail"]["per_repeat_speedup"]) == 2
    assert "_vs-padded" in out.parent.name
