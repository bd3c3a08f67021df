"""The output folder: what it holds, what a run may write or delete there, its checkpoints, and resuming from it."""
