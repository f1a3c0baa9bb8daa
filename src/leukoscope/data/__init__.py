"""Data layer: dataset layouts, patient-level splits, and in-memory image loading."""

from .layouts import Dataset, Sample, detect_layout
from .splits import SPLITS, make_splits, read_splits, run_splits, write_splits

__all__ = ["Dataset", "Sample", "detect_layout", "SPLITS", "make_splits", "read_splits", "run_splits", "write_splits"]
