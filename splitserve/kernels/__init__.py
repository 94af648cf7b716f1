"""Attention and layer kernels. Leaves: they import torch (and triton) only.

Today every kernel is its PyTorch reference; Triton versions dispatch from the same functions.
"""
