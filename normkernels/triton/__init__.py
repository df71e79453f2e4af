"""Triton kernels for every normkernels op, one file per family, plus the shared pieces.

They serve the same ops as the C++ kernels: registered as the CUDA implementation of
``torch.ops.normkernels.*`` (normkernels/_ops.py), and run on CPU tensors under Triton's
interpreter (``TRITON_INTERPRET=1``) inside ``normkernels.backend("triton")``. Each launcher has
exactly its op's signature and returns what the C++ kernel returns (same shapes, dtypes and
memory formats), so one fake kernel serves both.
"""
from .batch_norm import batch_norm_bwd, batch_norm_fwd, batch_norm_infer
from .group_norm import group_norm_bwd, group_norm_fwd
from .launch import LAUNCHES
from .layer_norm import layer_norm_bwd, layer_norm_fwd

IMPLS = {
    "layer_norm_fwd": layer_norm_fwd,
    "layer_norm_bwd": layer_norm_bwd,
    "group_norm_fwd": group_norm_fwd,
    "group_norm_bwd": group_norm_bwd,
    "batch_norm_fwd": batch_norm_fwd,
    "batch_norm_infer": batch_norm_infer,
    "batch_norm_bwd": batch_norm_bwd,
}

__all__ = ["IMPLS", "LAUNCHES"]
