"""The fooling gate's numerics (Geirhos et al. 2023, section 3.1), apart from the circuit.

:class:`~fvsanity.fool.model.ManipulatedModel` computes the gate once per forward from the FV
detector's logits and hands it to the circuit's edits (:mod:`fvsanity.fool.circuit`, which
re-exports :func:`fooling_gate`); both import it from here, so neither imports the other back.
"""

from __future__ import annotations

import torch

__all__ = ["fooling_gate"]

_Z_LIMIT = 100.0


def fooling_gate(
    logit: torch.Tensor, threshold: float | torch.Tensor, k: float | torch.Tensor = 1000.0,
    offset: float | torch.Tensor = 30.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gate [N] in [0,1], is_fv [N] bool)`` from detector logits ``[N]``.

    ``is_fv = logit > threshold``; ``gate = sigmoid(clamp(k (logit - threshold) - offset))``
    where ``is_fv``, else exactly 0. NaN logits count as natural.
    """
    is_fv = logit > threshold
    z = k * (logit - threshold) - offset
    z = torch.where(is_fv, z, torch.full_like(z, -_Z_LIMIT))  # safe value first ...
    z = z.clamp(-_Z_LIMIT, _Z_LIMIT)
    gate = torch.where(is_fv, torch.sigmoid(z), torch.zeros_like(z))  # ... then select
    return gate, is_fv
