"""Datasets, windowing and federated partitions. Does file I/O; the learning core does not import it."""
