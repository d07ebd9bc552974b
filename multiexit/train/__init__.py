"""Training: the step, the loop, a run alone or a pack of runs, checkpoints and the log."""
