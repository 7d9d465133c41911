"""How stable a unit's verdict is under another draw of its FV seeds: leave-one-seed-out.

An FV is the end of a chaotic optimization: a 1e-7 change of its start (another batch shape, in
the old generator) gave another image, and so can another seed. A verdict that holds with all
S seeds but flips when any one of them is left out rests on that one seed; the user should see
that before trusting a "natural-like". :func:`leave_one_seed_out` recomputes the unit's verdict
from every (S - 1)-seed subset (no new FVs, no forward pass: the per-seed similarity scores are
reused) and reports how many subsets agree with the full verdict, at the unit's own layer and
over its whole layer profile.

"Not assessable" is said when S - 1 seeds cannot reach the full verdict's claim at all (the
sign-flip floor 2^-(S-1) above alpha, e.g. S = 5: 4 seeds reach p >= 0.0625): then a flip says
nothing about fragility, only about power, and the note says how many seeds would make it
assessable.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .verdict import (
    DIVERGES,
    NATURAL_LIKE,
    VerdictError,
    VerdictSettings,
    attainable_p,
    layer_evidence,
    no_evidence,
    separation,
    unit_verdict,
)

__all__ = ["SeedStability", "leave_one_seed_out"]


@dataclass(frozen=True)
class SeedStability:
    """Agreement of the leave-one-seed-out verdicts with the full one.

    Attributes:
        n_subsets: subsets tried (S, one per left-out seed; 0 with fewer than 2 seeds).
        own_agree: subsets whose outcome at the unit's own layer equals the full one.
        profile_agree: subsets whose outcome at every layer equals the full one.
        assessable: whether S - 1 seeds can reach the full verdict's own-layer claim at all
            (always True for an "inconclusive" full verdict).
        note: one sentence for the report.
    """

    n_subsets: int
    own_agree: int
    profile_agree: int
    assessable: bool
    note: str
    decided: bool = False

    @property
    def fragile(self) -> bool:
        """A decided verdict (natural-like / diverges) that some assessable subset does not keep."""
        return (self.decided and self.assessable and self.n_subsets > 0
                and self.own_agree < self.n_subsets)

    def to_json(self) -> dict:
        return {"n_subsets": self.n_subsets, "own_agree": self.own_agree, "profile_agree": self.profile_agree,
                "decided": self.decided, "assessable": self.assessable, "fragile": self.fragile, "note": self.note}


def _reachable(outcome: str, n: int, n_layers: int, st: VerdictSettings) -> bool:
    if outcome == NATURAL_LIKE:
        return attainable_p(n, correction="fixed-sequence", share=st.natural_share, n_perm=st.n_signflips) <= st.alpha
    if outcome == DIVERGES:
        return attainable_p(n, n_layers=n_layers, correction="holm", share=st.natural_share,
                            n_perm=st.n_signflips) <= st.alpha
    return True


def leave_one_seed_out(
    names: Sequence[str],
    scores: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    full,
    settings: VerdictSettings,
    seed: int = 0,
) -> SeedStability:
    """Leave-one-seed-out agreement of a unit's verdict.

    Args:
        names: the unit's layers in path order (own layer last).
        scores: per layer (fv_ref [S, m], ref_ref [m, m], other_ref [n, m]), the similarity
            matrices its verdict was computed from.
        full: the unit's :class:`~fvsanity.compare.verdict.UnitVerdict` with all S seeds.
        settings: the verdict settings it was computed with.
        seed: seeds the sign patterns (only drawn with more than 16 seeds).
    """
    if not scores:
        return SeedStability(0, 0, 0, True, "no layers")
    s = int(scores[0][0].shape[0])
    if s < 2:
        return SeedStability(0, 0, 0, False, f"needs >= 2 FV seeds to leave one out (has {s})")
    full_outs = [o.outcome for o in full.layers]
    own = full.outcome
    assessable = _reachable(own, s - 1, len(names), settings)
    # the references' separation does not depend on the FVs: computed once per layer
    seps = []
    for _, r, o in scores:
        try:
            seps.append(separation(r, o, settings))
        except VerdictError:  # too few references: layer_evidence says so per subset
            seps.append(None)
    own_agree = profile_agree = 0
    for j in range(s):
        keep = torch.tensor([i for i in range(s) if i != j])
        gen = torch.Generator().manual_seed(int(seed) + 7 + j)
        ev = []
        for name, (f, r, o), sep in zip(names, scores, seps):
            try:
                ev.append(layer_evidence(name, f[keep], r, o, n_layers=len(names), settings=settings, generator=gen,
                                         separated=sep))
            except VerdictError:
                ev.append(no_evidence(name))
        outs = [x.outcome for x in unit_verdict(ev, settings=settings).layers]
        own_agree += outs[-1] == own
        profile_agree += outs == full_outs
    if not assessable:
        need = s + 1
        while not _reachable(own, need - 1, len(names), settings) and need < 64:
            need += 1
        note = (f"not assessable: {s - 1} seeds cannot reach '{own}' at all; with >= {need} seeds a "
                "left-out seed would show whether it rests on one seed")
    elif own not in (NATURAL_LIKE, DIVERGES):
        note = f"inconclusive with all {s} seeds; {s - own_agree} of {s} leave-one-out subsets decide its own layer"
    elif own_agree == s:
        note = f"stable: '{own}' at its own layer with any one of the {s} seeds left out"
    else:
        note = (f"fragile: leaving out one seed keeps '{own}' at its own layer in {own_agree} of {s} cases; "
                "another seed draw could change it")
    return SeedStability(s, own_agree, profile_agree, assessable, note, own in (NATURAL_LIKE, DIVERGES))
