"""``normkernels.convert(model)``: every torch.nn norm module of a model onto normkernels."""
from __future__ import annotations

from torch import nn

from .nn import TWINS


def convert(model: nn.Module) -> nn.Module:
    """Swap, in place, every torch.nn norm module inside ``model`` (at any depth, the model itself
    included) for its normkernels twin, and return ``model``.

    Only modules whose type is exactly a torch.nn norm class are swapped (a user's subclass may
    compute differently, so it is left alone). A twin is a subclass of the torch.nn class adding
    no state, so the swap changes only the module's class: parameters, buffers, hooks, device,
    dtype and train/eval mode are the very same objects, and ``state_dict`` keys do not change.
    """
    for module in model.modules():
        twin = TWINS.get(type(module))
        if twin is not None:
            module.__class__ = twin
    return model
