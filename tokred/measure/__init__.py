"""tokred's single measurement protocol (methods.md Sec. 8): GFLOPs, throughput and memory, token accounting,
provenance. Results files (metrics.json) live in ``tokred.results``."""

from tokred.measure.bench import BenchmarkOOMError, benchmark, compare, pair_summary
from tokred.measure.flops import FLOP_CONVENTION, analytic_vit_gflops, combine_gflops, count_gflops, sdpa_flop_jit
from tokred.measure.provenance import provenance
from tokred.measure.tokens import TokenAccounting

__all__ = [
    "FLOP_CONVENTION", "BenchmarkOOMError", "TokenAccounting", "analytic_vit_gflops", "benchmark", "combine_gflops",
    "compare", "count_gflops", "pair_summary", "provenance", "sdpa_flop_jit",
]
