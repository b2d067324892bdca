"""tokred-baselines: reference reducers shipped as a separate plugin distribution.

Each reducer is registered through the ``tokred.reducers`` entry-point group (see ``pyproject.toml``), so
``tokred.create_reducer("random_prune", r=8)`` and ``merger=...`` / ``pruner=...`` config choices find them
once the distribution is installed. The package uses tokred's public API only; it is the worked example
of an outside reducer (guide: ``baselines/README.md``).

Reducers:
    random_prune: ``RandomPrune``, prunes ``r`` pseudo-random tokens after chosen blocks (Token Cropr's
        random-pruner baseline, Bergner et al. CVPR 2025).
    uniform_pool: ``UniformPool``, merges every aligned ``window x window`` patch window into one token
        (bigger patches everywhere, the content-blind counterpart of CTS / dCTS).
    oracle_superpatches: ``OracleSuperpatches``, dCTS with the ground-truth policy (the upper bound of
        dCTS, STEP / methods.md Sec. 1).
"""

from tokred_baselines.oracle_superpatches import OracleSuperpatches
from tokred_baselines.random_prune import RandomPrune
from tokred_baselines.uniform_pool import UniformPool

__version__ = "0.1.0"

__all__ = ["OracleSuperpatches", "RandomPrune", "UniformPool", "__version__"]
