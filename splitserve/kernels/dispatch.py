"""Which kernel family runs an operation: Triton for CUDA tensors, the native CPU kernels (cpu_kernels.c) for
fp32 CPU tensors where they build, else the PyTorch reference. `SPLITSERVE_KERNELS` overrides it: `reference`
(PyTorch only, also on CUDA, for comparison) or `triton` (also on the CPU, for tests under
`TRITON_INTERPRET=1`)."""

from __future__ import annotations

import os

import torch

from splitserve.kernels import cpu_kernels


def _mode() -> str:
    mode = os.environ.get("SPLITSERVE_KERNELS", "auto")
    if mode not in ("auto", "reference", "triton"):
        raise ValueError(f"SPLITSERVE_KERNELS must be auto, reference or triton, got {mode!r}")
    return mode


def use_triton(t: torch.Tensor) -> bool:
    mode = _mode()
    return mode == "triton" or (mode == "auto" and t.is_cuda)


def use_native(t: torch.Tensor) -> bool:
    """The native CPU kernels (cpu_kernels.c) for fp32 CPU tensors, unless SPLITSERVE_KERNELS says otherwise."""
    return _mode() == "auto" and cpu_kernels.native(t)
