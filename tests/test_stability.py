"""Leave-one-seed-out stability of a unit's verdict on constructed similarity scores."""

from __future__ import annotations

import torch

from fvsanity.compare.stability import leave_one_seed_out
from fvsanity.compare.verdict import NATURAL_LIKE, VerdictSettings, layer_evidence, unit_verdict


def _scores(fv_levels, m: int = 12, n: int = 40, seed: int = 0):
    """(fv_ref [S, m], ref_ref [m, m], other_ref [n, m]): references ~0.8 among themselves,
    other images ~0.2, FV seed i at ``fv_levels[i]``; small noise."""
    g = torch.Generator().manual_seed(seed)
    rr = 0.8 + 0.02 * torch.randn(m, m, generator=g, dtype=torch.float64)
    rr = (rr + rr.T) / 2
    rr.fill_diagonal_(1.0)
    orr = 0.2 + 0.02 * torch.randn(n, m, generator=g, dtype=torch.float64)
    f = torch.tensor(fv_levels, dtype=torch.float64)[:, None] + 0.01 * torch.randn(len(fv_levels), m, generator=g,
                                                                                    dtype=torch.float64)
    return f, rr, orr


def _run(levels):
    st = VerdictSettings()
    sc = [_scores(levels)]
    full = unit_verdict([layer_evidence("own", *sc[0], settings=st)], settings=st)
    return full, leave_one_seed_out(["own"], sc, full, st)


def test_clear_natural_like_is_stable():
    full, stab = _run([0.8] * 8)
    assert full.outcome == NATURAL_LIKE
    assert stab.n_subsets == 8 and stab.own_agree == 8 and stab.assessable and not stab.fragile
    assert stab.note.startswith("stable")


def test_verdict_at_the_edge_is_fragile():
    """Six seeds just above the natural-like threshold (0.68 on this scale) and one below: all
    seven reach the claim, but leaving out one of the six often does not."""
    full, stab = _run([0.72] * 6 + [0.64])
    assert full.outcome == NATURAL_LIKE
    assert stab.assessable and stab.fragile and 0 < stab.own_agree < 7
    assert stab.note.startswith("fragile") and f"in {stab.own_agree} of 7" in stab.note


def test_five_seeds_are_not_assessable():
    """With 5 seeds a natural-like claim is reachable (2^-5 < 0.05), with 4 it is not."""
    full, stab = _run([0.8] * 5)
    assert full.outcome == NATURAL_LIKE
    assert not stab.assessable and not stab.fragile
    assert "not assessable" in stab.note and ">= 6 seeds" in stab.note


def test_one_seed_cannot_leave_one_out():
    full, stab = _run([0.8])
    assert stab.n_subsets == 0 and "needs >= 2" in stab.note
