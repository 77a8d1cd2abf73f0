"""Data: on-disk index, temporal sampling, synthetic videos, the CPU (PyAV) loader."""
from goca_fast.data.batch import ClipBatch

__all__ = ["ClipBatch"]
