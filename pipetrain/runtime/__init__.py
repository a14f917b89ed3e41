"""Executors of schedules: the single-process reference and the Dask runtime."""
