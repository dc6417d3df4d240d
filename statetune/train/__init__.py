"""``statetune train``: the training loop, its checkpoints, logging and data parallelism."""
