"""tokred's single measurement protocol (methods.md Sec. 8): GFLOPs with attention, throughput and memory,
token accounting, provenance. The metrics.json schema, writer and loader live in ``tokred.results``."""

from tokred.measure.bench import (
    PRECISIONS,
    BenchmarkOOMError,
    available_devices,
    benchmark,
    compare,
    compare_many,
    cpu_name,
    device_name,
    pair_summary,
)
from tokred.measure.flops import (
    EXTRA_HANDLES,
    FLOP_CONVENTION,
    analytic_vit_gflops,
    combine_gflops,
    count_gflops,
    sdpa_flop_jit,
)
from tokred.measure.overheads import measure_overheads, register_component
from tokred.measure.provenance import git_state, provenance
from tokred.measure.tokens import TokenAccounting

__all__ = [
    "EXTRA_HANDLES", "FLOP_CONVENTION", "PRECISIONS", "BenchmarkOOMError", "TokenAccounting", "analytic_vit_gflops",
    "available_devices", "benchmark", "combine_gflops", "compare", "compare_many", "count_gflops", "cpu_name",
    "device_name", "git_state", "measure_overheads", "pair_summary", "provenance", "register_component",
    "sdpa_flop_jit",
]
