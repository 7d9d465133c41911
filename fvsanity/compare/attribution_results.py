"""The frozen results of edge attribution: :class:`LayerEdges` per layer and
:class:`EdgeAttribution` for a unit (see :mod:`fvsanity.compare.attribution`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..units import Unit
from .attribution_references import AttributionError

__all__ = ["LayerEdges", "EdgeAttribution"]


# ------------------------------------------------------------------------------ results
@dataclass(frozen=True)
class LayerEdges:
    """Edge scores of one module for N images.

    Attributes:
        name: module name; kind: "conv" | "linear" | "skip".
        rows: output channels the score rows stand for (the unit's channel alone for the unit's own
            layer, else all).
        in_channels: number of input channels (score columns).
        scores: [N, V, U] per-image edge scores ~= m(edge patched to reference) - m(clean), in
            units of the metric (the unit's activation).
        mask: [V, U] bool, structurally present edges (nonzero weight slice; skip: src(v) -> v).
        node_in: [N, U] node attribution of the input channels, sum over space of
            (a_clean - a_ref) * g (g = dm/d input, averaged over the IG path for EAP-IG).
        node_out: [N, V] the same for the output channels (at the conv output, pre-BN).
        input_from: earlier layer reading the very same input tensor (parallel branches), or None.
    """

    name: str
    kind: str
    rows: tuple[int, ...]
    in_channels: int
    scores: torch.Tensor = field(repr=False)
    mask: torch.Tensor = field(repr=False)
    node_in: torch.Tensor = field(repr=False)
    node_out: torch.Tensor = field(repr=False)
    input_from: str | None = None

    @property
    def n_edges(self) -> int:
        return int(self.mask.sum())

    def mean(self) -> torch.Tensor:
        """[V, U] mean edge score over images."""
        return self.scores.mean(0)

    def to_json(self) -> dict:
        mean = self.mean()
        return {
            "name": self.name,
            "kind": self.kind,
            "shape": [len(self.rows), self.in_channels],
            "n_edges": self.n_edges,
            "n_images": int(self.scores.shape[0]),
            "score_sum": float(mean.sum()),
            "score_abs_max": float(mean.abs().max()),
            "input_from": self.input_from,
        }


@dataclass(frozen=True)
class EdgeAttribution:
    """Edge scores of every chosen module for one unit and one set of images.

    Attributes:
        unit, method ("eap" | "eap-ig"), reference (name or "given"), steps (IG points; 1 for EAP).
        layers: one :class:`LayerEdges` per module, forward order.
        metric_clean, metric_ref: [N] the unit's activation on the images and on their references.
    """

    unit: Unit
    method: str
    reference: str
    steps: int
    layers: tuple[LayerEdges, ...]
    metric_clean: torch.Tensor = field(repr=False)
    metric_ref: torch.Tensor = field(repr=False)

    @property
    def names(self) -> list[str]:
        return [lay.name for lay in self.layers]

    def layer(self, name: str) -> LayerEdges:
        for lay in self.layers:
            if lay.name == name:
                return lay
        raise AttributionError(f"no layer {name!r} in this attribution; valid: {', '.join(self.names)}")

    def to_json(self) -> dict:
        return {
            "unit": str(self.unit),
            "method": self.method,
            "reference": self.reference,
            "steps": self.steps,
            "n_images": int(self.metric_clean.shape[0]),
            "metric_clean_mean": float(self.metric_clean.mean()),
            "metric_ref_mean": float(self.metric_ref.mean()),
            "layers": [lay.to_json() for lay in self.layers],
        }
