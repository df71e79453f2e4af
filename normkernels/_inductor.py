"""The op layer: inductor told to call our kernels for the ops that have a decomposition.

Inductor runs an op it has no lowering for by calling the op (an "implicit fallback"). When
the op also has a decomposition in torch's table, as our forward ops do for exporters
(_decompositions.py), and the environment sets ``CI`` (GitHub Actions and most CI services do),
inductor refuses that fallback: an AssertionError asking for the decomposition instead, so
``torch.compile`` and AOTInductor of any model on our norms failed in CI jobs. Registering the
same fallback explicitly, without the warning (``make_fallback(op, warn=False)``, as inductor
does for the ATen ops it means to keep), is what it asks of ops that are to stay ops. The layout
constraint is the one the implicit fallback gives, so the compiled code is the same with or
without ``CI``.

Inductor's lowering module takes longer to import (~1.8 s) than normkernels itself, so it is
not imported here: the fallbacks are registered when it is first imported, or at once if it
already is (_after_import.py).
"""
from __future__ import annotations

import warnings

import torch

from ._after_import import call_after_import

_LOWERING = "torch._inductor.lowering"


def _layout_constraint(lowering, op):
    """The constraint on input strides that inductor's implicit fallback gives a custom op."""
    tag_to_constraint = getattr(lowering, "tag_to_layout_constraint", None)
    if tag_to_constraint is None:  # torch 2.6 and 2.7: contiguous inputs, the op untagged
        return lowering.require_contiguous
    from torch._library.utils import get_layout_constraint_tag

    return tag_to_constraint(get_layout_constraint_tag(op, with_default=True))


def register_fallbacks(lowering) -> None:
    """Make each op of ours that has a decomposition in torch's table a fallback of inductor's
    (``lowering`` is the module torch._inductor.lowering)."""
    decomposed = [op for op in torch._decomp.decomposition_table
                  if isinstance(op, torch._ops.OpOverload) and op.namespace == "normkernels"]
    try:
        for op in decomposed:
            if op not in lowering.lowerings:
                lowering.make_fallback(op, layout_constraint=_layout_constraint(lowering, op),
                                       warn=False)
    except (AttributeError, ImportError, TypeError) as e:  # an inductor whose API moved
        warnings.warn(f"normkernels could not register its ops with inductor ({e}); "
                      "torch.compile still runs them, but fails where the environment sets CI")


call_after_import(_LOWERING, register_fallbacks)
