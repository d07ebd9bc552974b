"""Early exit: one rule (``rule``), its thresholds and budgets (``thresholds``), the three ways
of running it (``shrinking``; ``streaming`` and ``latency`` on ``fixed_size`` steps, which
replay as CUDA graphs on a GPU) and their measured time per exit (``timing``)."""
