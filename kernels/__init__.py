"""Compute kernels: plain-torch reference ops (run on CPU, fp32) and their Triton fast paths.

Knows nothing of models: inputs and outputs are tensors with the shapes documented per function.
"""

import os


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1 at import time); the Triton
    wrappers then accept CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def interpreter_usable() -> bool:
    """Triton is importable, its CPU interpreter is on, and it can run our kernels (Triton 3.6's fails on
    runtime-bounded loops with numpy >= 2.4: int() of a 1-element array)."""
    try:
        import numpy as np
        import triton
    except ImportError:
        return False
    version = lambda v: tuple(int(p) for p in v.split(".")[:2])
    return interpreting() and (version(np.__version__) < (2, 4) or version(triton.__version__) > (3, 6))
