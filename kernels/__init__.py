"""Compute kernels: plain-torch reference ops (run on CPU, fp32) and their Triton fast paths.

Knows nothing of models: inputs and outputs are tensors with the shapes documented per function.
"""
