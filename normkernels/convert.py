"""``normkernels.convert(model)``: every torch.nn norm module of a model onto normkernels;
``normkernels.revert(model)``: back onto torch.nn."""
from __future__ import annotations

from torch import nn

from .nn import TWINS

# normkernels class -> the torch.nn class it replaces
_TORCH_OF = {ours: theirs for theirs, ours in TWINS.items()}


def convert(model: nn.Module) -> nn.Module:
    """Swap, in place, every torch.nn norm module inside ``model`` (at any depth, the model itself
    included) for its normkernels twin, and return ``model``.

    Only modules whose type is exactly a torch.nn norm class are swapped (a user's subclass may
    compute differently, so it is left alone). A twin is a subclass of the torch.nn class adding
    no state, so the swap changes only the module's class: parameters, buffers, hooks, device,
    dtype and train/eval mode are the very same objects, and ``state_dict`` keys do not change.
    """
    return _swap(model, TWINS)


def revert(model: nn.Module) -> nn.Module:
    """The inverse of ``convert``: every normkernels module inside ``model`` back to the torch.nn
    class it replaces, in place, state kept; returns ``model``. For tools that match torch's
    classes by exact type or know nothing of our ops (``torch.ao.quantization.fuse_modules``,
    the legacy TorchScript-based ONNX exporter)."""
    return _swap(model, _TORCH_OF)


def _swap(model: nn.Module, classes: dict) -> nn.Module:
    for module in model.modules():
        target = classes.get(type(module))
        if target is not None:
            module.__class__ = target
    return model
