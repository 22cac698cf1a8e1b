"""Tensor parallelism: the process group (parallel_state) and its collectives (communication)."""
