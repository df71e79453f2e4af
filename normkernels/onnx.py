"""ONNX export of models whose norms are ours.

Plain ``torch.onnx.export(model, args, "model.onnx")`` works (its default, torch.export-based
exporter, ``dynamo=True`` — the default from torch 2.9 on): each of our forward ops has a
decomposition into ATen ops in torch's table (normkernels/_decompositions.py), which the
exporter applies to any op it has no ONNX function for, then translates as it does torch's own
modules: a converted model exports to the same normalization operators (LayerNormalization,
InstanceNormalization, BatchNormalization) as the torch.nn one. The file needs nothing of
normkernels to run.

The legacy TorchScript-based exporter (``dynamo=False``, the default before torch 2.9) knows no
decompositions and is not supported: ``normkernels.revert(model)`` gives a model it exports.

``export`` and ``translation_table`` remain from when our ops needed translations of their own;
neither is needed now.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Dict

import torch

__all__ = ["translation_table", "export"]


def translation_table() -> Dict[Any, Callable]:
    """An empty table: our ops no longer need translations of their own (torch.onnx.export
    decomposes them, see the module's docstring). Kept so callers passing it as
    ``custom_translation_table`` keep working."""
    warnings.warn("normkernels.onnx.translation_table() is no longer needed: torch.onnx.export "
                  "exports our ops as they are", DeprecationWarning, stacklevel=2)
    return {}


def export(model, args, f=None, **kwargs):
    """torch.onnx.export(model, args, f, dynamo=True, ...): returns its ONNXProgram. Refuses
    dynamo=False (the legacy exporter cannot export our ops) with a ValueError."""
    if kwargs.pop("dynamo", True) is not True:
        raise ValueError("normkernels.onnx.export: only the torch.export-based exporter "
                         "(dynamo=True) can export our ops; for dynamo=False, export "
                         "normkernels.revert(model)")
    return torch.onnx.export(model, args, f, dynamo=True, **kwargs)
