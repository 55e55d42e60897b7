"""Torch facts shared by bnlab.torch and the Triton kernels (:mod:`bnlab.kernels.triton_bn`,
which take torch tensors): the memory-format rule and the dtypes the Triton kernels take."""

from __future__ import annotations

import torch

# inputs the Triton kernels take (statistics are float32)
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def memory_format(x: torch.Tensor) -> torch.memory_format:
    """The memory format a kernel reads ``x`` in and writes its output in (torch's rule):
    channels-last when x is channels-last and not also plain contiguous, else contiguous."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format
