"""Shared test helpers: the PyTorch reference and tensors in both layouts."""

import os
import sys
from pathlib import Path

# tools/ holds what the tests share with the GPU scripts (tools/gpu_cases.py)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

# The Triton kernels run in Triton's interpreter on CPU tensors (decided when bnlab first
# imports Triton, so before any test does).
os.environ.setdefault("TRITON_INTERPRET", "1")

# backend="auto" runs bnlab's kernels wherever they take the input (BNLAB_AUTO=kernels), in
# this process and in every one the tests spawn: the suite's tensors are small, where the
# committed measurements send auto to torch's kernel, and the tests of the engines must
# reach bnlab's. tests/test_engine_auto.py tests the measured weighing itself (the default)
# with the committed tables.
os.environ["BNLAB_AUTO"] = "kernels"

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import torch  # noqa: E402  (a test dependency: the reference)
torch.set_num_threads(1)

# Channel axis and the PyTorch class of each layout bnlab supports.
LAYOUTS = {
    "NC": dict(shape=(8, 5), axis=1),
    "NCL": dict(shape=(4, 5, 7), axis=1),
    "NCHW": dict(shape=(4, 3, 5, 6), axis=1),
    "NHWC": dict(shape=(4, 5, 6, 3), axis=-1),
}


def to_torch(a, layout="NCHW"):
    """NumPy -> float64 torch tensor in PyTorch's channels-first layout."""
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))
    return t.permute(0, 3, 1, 2) if layout == "NHWC" else t


def from_torch(t, layout="NCHW"):
    """torch tensor in channels-first layout -> NumPy in ``layout``."""
    t = t.detach()
    return (t.permute(0, 2, 3, 1) if layout == "NHWC" else t).numpy()


def sample(rng, shape, dtype=np.float64, loc=0.0, scale=1.0):
    """Gaussian data with a per-channel-ish offset so statistics are not trivial."""
    return (loc + scale * rng.standard_normal(shape)).astype(dtype)


@pytest.fixture
def rng():
    return np.random.default_rng(0)
