"""Evaluation: metrics over a split, the per-exit report, costs per exit, figures."""
