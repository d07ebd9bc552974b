"""Scripts that reproduce the paper's experiments (``python3 -m experiments.grid``)."""
