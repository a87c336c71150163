"""Kernel tests run Triton kernels in Triton's interpreter (no GPU here); set before any
@triton.jit decorates (collection imports every test module first). TRITON_INTERPRET=0
in the environment runs them compiled on a GPU machine."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
