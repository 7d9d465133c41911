"""One implementation of each shared piece: AUROC, set Jaccard, rank/linear correlation, hooks.

Known answers for the shared functions, a no-hook-left-behind test for ``hooks.hooked``, and a
scan of the package source proving no second copy has crept back in.
"""

from __future__ import annotations

import ast
import math
import re
from pathlib import Path

import numpy as np
import pytest
import scipy.stats as ss
import torch
from torch import nn

from fvsanity.compare import circuits, detect, similarity
from fvsanity.compare.similarity import jaccard
from fvsanity.compare.stats import MetricError, auroc
from fvsanity.fool import slingshot
from fvsanity.hooks import count_hooks, hooked

PKG = Path(__file__).resolve().parents[1] / "fvsanity"
SOURCES = {p.relative_to(PKG).as_posix(): p.read_text() for p in PKG.rglob("*.py")}


# ------------------------------------------------------------------------------------ AUROC
def test_auroc_known_answers():
    assert auroc([0.1, 0.2, 0.3], [0.5, 0.9]) == 1.0  # perfect separation
    assert auroc([0.5, 0.9], [0.1, 0.2, 0.3]) == 0.0  # reversed
    assert auroc([1.0, 1.0], [1.0, 1.0, 1.0]) == 0.5  # all ties
    # by hand, pairs (pos, neg): 2>1 1, 2=2 1/2, 2<3 0; 3>1 1, 3>2 1, 3=3 1/2 -> 4 / 6
    assert auroc([1.0, 2.0, 3.0], [2.0, 3.0]) == pytest.approx(4 / 6, abs=1e-15)
    assert math.isnan(auroc([], [1.0])) and math.isnan(auroc([1.0], []))  # an empty class
    assert math.isnan(auroc([float("nan"), 0.0], [1.0]))  # NaN in, NaN out
    with pytest.raises(detect.DetectionError):  # the detector's wrapper refuses it
        detect.roc_auc([float("nan")], [1.0])


def test_auroc_matches_pairwise_count_and_its_callers():
    g = torch.Generator().manual_seed(0)
    neg = torch.randint(0, 6, (40,), generator=g).double()  # many ties
    pos = torch.randint(2, 8, (30,), generator=g).double()
    pairs = (pos[:, None] > neg[None]).double() + 0.5 * (pos[:, None] == neg[None]).double()
    want = float(pairs.mean())
    assert auroc(neg, pos) == pytest.approx(want, abs=1e-12)
    assert detect.roc_auc(neg.numpy(), pos.numpy()) == pytest.approx(want, abs=1e-12)
    scores, labels = torch.cat([neg, pos]), torch.cat([torch.zeros(40), torch.ones(30)]).bool()
    assert slingshot.auroc(scores, labels) == pytest.approx(want, abs=1e-12)


# ---------------------------------------------------------------------------------- Jaccard
def test_jaccard_known_answers():
    a = torch.tensor([True, True, False, False])
    assert float(jaccard(a, a)) == 1.0  # identical
    assert float(jaccard(a, ~a)) == 0.0  # disjoint
    assert float(jaccard(torch.zeros(4, dtype=torch.bool), torch.zeros(4, dtype=torch.bool))) == 1.0  # empty vs empty
    assert float(jaccard(torch.zeros(4, dtype=torch.bool), a)) == 0.0  # empty vs non-empty
    b = torch.tensor([False, True, True, False])
    assert float(jaccard(a, b)) == pytest.approx(1 / 3)  # {0, 1} vs {1, 2}
    rows = jaccard(torch.stack([a, b, ~a]), a)  # batched over leading dims
    torch.testing.assert_close(rows, torch.tensor([1.0, 1 / 3, 0.0], dtype=torch.float64))
    with pytest.raises(MetricError):
        jaccard(a, torch.ones(3, dtype=torch.bool))


def test_top_k_jaccard_of_circuits_uses_the_set_jaccard():
    assert circuits.top_k_jaccard([5, 4, 3, 2, 1, 0], [5, 0, 3, 0, 0, 0], 3) == pytest.approx(2 / 3)
    assert circuits.top_k_jaccard([0, 0], [0, 0], 1) == 1.0  # nothing selected by either


# ------------------------------------------------------------------------- rank correlation
def test_edge_rank_correlation_is_the_vector_spearman():
    g = np.random.default_rng(0)
    a = g.integers(0, 5, 50).astype(float)  # ties
    b = a + g.integers(0, 3, 50)
    assert circuits.edge_rank_correlation(a, b) == pytest.approx(ss.spearmanr(a, b)[0], abs=1e-12)
    got = float(similarity.spearman(torch.from_numpy(a), torch.from_numpy(b)))
    assert circuits.edge_rank_correlation(a, b) == got
    assert circuits.edge_rank_correlation(np.ones(5), np.arange(5.0)) == 0.0  # constant: finite, 0


# -------------------------------------------------------------------------------- hooks
class _Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(2, 2), nn.Linear(2, 2)

    def forward(self, x):
        return self.b(self.a(x))


def test_hooked_registers_in_order_and_removes_every_hook_even_when_the_block_raises():
    m = _Two()
    calls = []
    fwd = [("a", lambda _m, _i, _o: calls.append("a")), (m.b, lambda _m, _i, _o: calls.append("b1")),
           ("b", lambda _m, _i, _o: calls.append("b2"))]
    with hooked(m, fwd), hooked(m, {"b": lambda _m, inp: calls.append("pre-b")}, pre=True):
        assert count_hooks(m) == 4
        m(torch.zeros(1, 2))
    assert calls == ["a", "pre-b", "b1", "b2"] and count_hooks(m) == 0
    with pytest.raises(RuntimeError, match="boom"):
        with hooked(m, {"a": lambda _m, _i, _o: None}):
            raise RuntimeError("boom")
    assert count_hooks(m) == 0
    with pytest.raises(Exception, match="nope"):  # an unknown name: nothing stays registered
        with hooked(m, [("a", lambda *_: None), ("nope", lambda *_: None)]):
            pass
    assert count_hooks(m) == 0


def test_hooked_return_values_replace_output_and_inputs():
    m = _Two()
    x = torch.ones(1, 2)
    with hooked(m, {"a": lambda _m, _i, o: torch.zeros_like(o)}):
        torch.testing.assert_close(m(x), m.b.bias[None].detach())
    with hooked(m, {"b": lambda _m, inp: (torch.zeros_like(inp[0]),)}, pre=True):
        torch.testing.assert_close(m(x), m.b.bias[None].detach())


# ------------------------------------------------------------------------ source scan
def _defs(pattern: str) -> list[str]:
    """``file:function`` of every function definition in the package whose name matches."""
    out = []
    for rel, text in SOURCES.items():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and re.fullmatch(pattern, node.name):
                out.append(f"{rel}:{node.name}")
    return sorted(out)


def _calls(rel: str, func: str) -> set[str]:
    """Names called inside function ``func`` of package file ``rel``."""
    tree = ast.parse(SOURCES[rel])
    fn = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == func)
    return {n.func.id if isinstance(n.func, ast.Name) else n.func.attr
            for n in ast.walk(fn) if isinstance(n, ast.Call) and isinstance(n.func, (ast.Name, ast.Attribute))}


def test_hooks_are_registered_only_in_hooks_module():
    where = sorted(rel for rel, text in SOURCES.items()
                   if re.search(r"register_forward_(pre_)?hook\(", text))
    assert where == ["hooks.py"]


def test_one_auroc_and_its_adapters_only_delegate():
    assert _defs(r"\w*(auroc|roc_auc|_auc|mann_whitney)\w*") == [
        "compare/detect.py:roc_auc", "compare/stats.py:auroc", "fool/slingshot.py:auroc"]
    # detect.roc_auc validates and slingshot.auroc splits by label; neither ranks or counts pairs
    assert "auroc" in _calls("compare/detect.py", "roc_auc")
    assert "_auroc" in _calls("fool/slingshot.py", "auroc")
    for rel, fn in (("compare/detect.py", "roc_auc"), ("fool/slingshot.py", "auroc")):
        assert not _calls(rel, fn) & {"rankdata", "argsort", "sort", "unique"}
    assert "scipy.stats import rankdata" not in "".join(SOURCES.values())


def test_one_set_jaccard():
    assert _defs(r"\w*jaccard\w*") == [
        "compare/circuits.py:_jaccard_many",  # top-k masks of numpy rows -> similarity.jaccard
        "compare/circuits.py:_weighted_jaccard_many",  # weighted Jaccard: a different statistic
        "compare/circuits.py:top_k_jaccard",  # -> _jaccard_many
        "compare/circuits.py:weighted_jaccard",
        "compare/similarity.py:jaccard",
    ]
    assert "jaccard" in _calls("compare/circuits.py", "_jaccard_many")
    assert "_jaccard_many" in _calls("compare/circuits.py", "top_k_jaccard")
    assert "jaccard" in _calls("fool/slingshot.py", "unit_diagnostics")


def test_one_spearman_and_one_pearson():
    assert _defs(r"\w*(spearman|pearson|correlation)\w*") == [
        "compare/circuits.py:_spearman_many",  # numpy rows -> similarity.spearman
        "compare/circuits.py:edge_rank_correlation",  # -> _spearman_many
        "compare/similarity.py:_pearson", "compare/similarity.py:pearson",
        "compare/similarity.py:soft_spearman",  # differentiable surrogate (soft ranks)
        "compare/similarity.py:spearman",
        "fool/metrics.py:pixel_correlation",  # -> similarity.pearson
    ]
    assert "_vector_spearman" in _calls("compare/circuits.py", "_spearman_many")
    assert "_spearman_many" in _calls("compare/circuits.py", "edge_rank_correlation")
    assert "pearson" in _calls("fool/metrics.py", "pixel_correlation")
    assert _defs(r"_?(avg_ranks|rankdata|ranks?)") == ["compare/stats.py:rankdata"]


def test_no_second_correlation_implementation():
    """Correlations come from fvsanity.compare.similarity (safe at constant inputs), not torch.corrcoef."""
    from pathlib import Path

    pkg = Path(__file__).resolve().parents[1] / "fvsanity"
    hits = [str(p.relative_to(pkg)) for p in pkg.rglob("*.py") if "corrcoef(" in p.read_text(encoding="utf-8")]
    assert hits == []
