"""Early exit: the exit rule, thresholds and budgets, and the ways of running it (a shrinking
batch, streaming, one image at a time) with their measured time."""
