"""Attention and layer kernels. Leaves: they import torch (and triton) only.

`attention` and `layers` are the dispatch points the model calls: Triton kernels (`triton_attention`,
`triton_layers`) for CUDA tensors, the native CPU kernels or the PyTorch references (`reference`, and the
`*_reference` functions in `layers`) for CPU tensors, as `dispatch` decides.
"""
