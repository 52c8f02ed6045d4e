"""amrseg: weakly supervised semantic segmentation with AMR."""

__version__ = "0.1.0"
