"""bnlab: batch normalization (Ioffe & Szegedy 2015) done properly in NumPy."""

from .functional import (
    batch_norm,
    batch_norm_backward,
    batch_norm_forward,
    batch_normalization,
    convert_weights,
    minmax_scale,
    moments,
    standardize,
)

__version__ = "0.1.0"

__all__ = [
    "batch_norm",
    "batch_norm_backward",
    "batch_norm_forward",
    "batch_normalization",
    "convert_weights",
    "minmax_scale",
    "moments",
    "standardize",
]
