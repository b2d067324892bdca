"""The jobs behind ``python -m tokred <command>``, one module each, imported only when their command runs.

``run`` (``tokred.jobs.run``), ``eval``, ``bench``, ``train-policy`` (``tokred.jobs.policy``), ``viz`` and
``list`` (``tokred.jobs.listing``, torch-free); ``ablate`` lives in ``tokred.ablations``. Each job takes the
composed Hydra config (``list`` takes nothing).
"""
