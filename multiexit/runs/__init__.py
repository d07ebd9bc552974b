"""Run folders: finding runs and checkpoints by name, and the runs table
(``python3 -m multiexit.runs``)."""
