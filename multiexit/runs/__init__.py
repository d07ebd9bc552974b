"""Run folders: finding runs and checkpoints by name (``find``), the runs of a snapshots folder
as a table (``table``; ``summary`` prints it), resumed runs' chains (``lineage``), training
curves (``curves``) and the command line (``python3 -m multiexit.runs``)."""
