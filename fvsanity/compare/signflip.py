"""Fisher's one-sample sign-flip randomization test (:func:`sign_flip`), the smallest p a
design can reach (:func:`attainable_p`) and how many replicates a claim needs
(:func:`replicates_needed`); see :mod:`fvsanity.compare.verdict`."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .verdict_settings import ALPHA, N_PERM, SIGNFLIP_EXACT_LIMIT, VerdictError

__all__ = ["attainable_p", "replicates_needed", "SignFlip", "sign_flip", "z_upper", "json_float"]


# ---------------------------------------------------------------------- attainable p, power
def _is_exact(n: int, n_perm: int, exact_limit: int) -> bool:
    return n <= 62 and 2**n <= max(n_perm, exact_limit)


def attainable_p(
    n: int,
    *,
    n_layers: int = 1,
    correction: str = "holm",
    share: float = 0.0,
    n_perm: int = N_PERM,
    exact_limit: int = SIGNFLIP_EXACT_LIMIT,
) -> float:
    """The smallest p a claim can reach with ``n`` replicates (FV seeds, or units).

    One-sided sign-flip test: exact (2^n <= max(n_perm, exact_limit)) 2^-n, the observed sign
    pattern alone as extreme (also the one-sided exact Wilcoxon signed-rank floor); Monte Carlo
    max(2^-n, 1 / (1 + n_perm)). ``correction``: ``"holm"`` over ``n_layers`` (the diverges
    claims: the smallest Holm-adjusted p is n_layers times the smallest raw p), or
    ``"fixed-sequence"`` / ``"none"`` (the natural-like claims: each layer at alpha). ``share``:
    the share of alpha spent on the natural side (per unit: ``VerdictSettings.natural_share``;
    across units 0): the p compared with alpha is p / (1 - share). n = 0: 1.

    Examples: n=1 -> 0.5; n=4 -> 0.0625; n=6, Holm over 5 layers -> 5/64 = 0.078125; n=4,
    share 0.2 -> 0.078125.
    """
    if correction not in ("holm", "fixed-sequence", "none"):
        raise VerdictError(f"unknown correction {correction!r}; valid: holm, fixed-sequence, none")
    if not (isinstance(n, int) and n >= 0) or not (isinstance(n_layers, int) and n_layers >= 1):
        raise VerdictError(f"need n >= 0 and n_layers >= 1, got n={n!r}, n_layers={n_layers!r}")
    if n == 0:
        return 1.0
    raw = 2.0**-n if _is_exact(n, n_perm, exact_limit) else max(2.0**-n, 1.0 / (1 + n_perm))
    if not (0 <= share < 1):
        raise VerdictError(f"share must be in [0, 1), got {share!r}")
    return min(1.0, raw * (n_layers if correction == "holm" else 1) / (1 - share))


def replicates_needed(
    alpha: float = ALPHA,
    *,
    n_layers: int = 1,
    correction: str = "holm",
    share: float = 0.0,
    n_perm: int = N_PERM,
    exact_limit: int = SIGNFLIP_EXACT_LIMIT,
) -> int | None:
    """The fewest replicates whose :func:`attainable_p` is <= ``alpha`` (None: none can, e.g. too
    few random sign patterns). Exact case: ceil(log2(n_layers / alpha)) for Holm, ceil(log2(1 /
    alpha)) otherwise: alpha 0.05 -> 5; Holm over 5 layers -> 7; over 12 layers -> 8 (share 0.2:
    5, 7, 9)."""
    for n in range(1, 63):
        p = attainable_p(n, n_layers=n_layers, correction=correction, share=share, n_perm=n_perm, exact_limit=exact_limit)
        if p <= alpha:
            return n
    return None


def _power_needed(sd: float, gap: float, alpha: float, power: float) -> int | None:
    """n with (z_{1-alpha} + z_power) * sd / sqrt(n) <= gap (normal approximation); None if the
    spread is unknown."""
    from statistics import NormalDist

    if not (math.isfinite(sd) and math.isfinite(gap)) or gap <= 0:
        return None
    z = NormalDist().inv_cdf(1 - alpha) + NormalDist().inv_cdf(power)
    if sd <= 0:
        return 1
    return max(1, math.ceil((z * sd / gap) ** 2 - 1e-9))


# ---------------------------------------------------------------------------- sign flips
@dataclass(frozen=True)
class SignFlip:
    """The sign-flip randomization distribution of the mean of replicates x [n].

    A sign pattern flips the replicates of a subset K. For a margin d, the pattern is at least as
    extreme as the observed one for "mean > d" iff sum_K (x_k - d) <= 0, for "mean < d" iff
    sum_K (x_k - d) >= 0 (ties within rounding count as extreme).

    Attributes:
        x: float64 [n] the replicates.
        sums: float64 [P] sum of x over the flipped subset of each pattern; sizes: [P] its size.
        exact: all 2^n patterns (p = k / 2^n), else P random ones (p = (1 + k) / (1 + P)).
    """

    x: torch.Tensor
    sums: torch.Tensor
    sizes: torch.Tensor
    exact: bool

    @property
    def n(self) -> int:
        return int(self.x.numel())

    def _den_add(self) -> tuple[float, float]:
        p = float(self.sums.numel())
        return (p, 0.0) if self.exact else (p + 1, 1.0)

    def _tol(self) -> torch.Tensor:
        if "_tol_cache" not in self.__dict__:  # per-pattern rounding tolerance, computed once
            tol = 1e-9 * max(1.0, float(self.x.abs().max()) if self.n else 1.0) * self.sizes.clamp_min(1)
            object.__setattr__(self, "_tol_cache", tol)
        return self.__dict__["_tol_cache"]

    def _p_many(self, d, var, greater: bool) -> torch.Tensor:
        """p at margins d [D] with extra variances var [D] (float64 [D]).

        The observed contrast sum(x - d) is shrunk by lambda = sqrt(V / (V + var)), V = sum((x -
        d)^2) / n^2 the sign-flip variance of the mean, so that ``var`` (the natural side's) is
        added to the seeds' own (lambda = 1 for var = 0: the exact test). A pattern flipping K is
        as extreme for "greater" iff 2 sum_K (x - d) <= (1 - lambda) sum(x - d); the observed
        pattern (K empty) always counts, so p >= the floor."""
        d = torch.as_tensor(d, dtype=torch.float64).reshape(-1)
        var = torch.as_tensor(var, dtype=torch.float64).reshape(-1).expand_as(d)
        den, add = self._den_add()
        dd = self.x[None, :] - d[:, None]  # [D, n]
        v = (dd**2).sum(1) / self.n**2
        tot = v + var
        lam = torch.where((var > 0) & (tot > 0), (v / torch.where(tot > 0, tot, torch.ones_like(tot))).sqrt(),
                          torch.ones_like(v))
        slack = ((1 - lam) * dd.sum(1))[:, None]  # [D, 1]
        contrast = 2 * (self.sums[None, :] - d[:, None] * self.sizes[None, :])  # [D, P]
        tol = 2 * self._tol()[None, :]
        ext = (contrast <= slack + tol) if greater else (contrast >= slack - tol)
        ext = ext | (self.sizes == 0)[None, :]
        return (add + ext.sum(1).to(torch.float64)) / den

    def p_greater(self, d: float, var: float = 0.0) -> float:
        """One-sided p of H0 mean <= d (against mean > d); ``var``: extra variance of d (0: the
        exact sign-flip test; see :meth:`_p_many`)."""
        return float(self._p_many([d], [var], True)[0])

    def p_less(self, d: float, var: float = 0.0) -> float:
        """One-sided p of H0 mean >= d (against mean < d); ``var`` as in :meth:`p_greater`."""
        return float(self._p_many([d], [var], False)[0])

    def _bound(self, alpha: float, lower: bool) -> float:
        den, add = self._den_add()
        nonempty = self.sizes > 0
        means = self.sums[nonempty] / self.sizes[nonempty]
        k_empty = float((~nonempty).sum())
        j = math.floor(alpha * den - add - k_empty + 1e-9)  # patterns allowed beyond the empty ones
        if j < 0:
            return -math.inf if lower else math.inf
        if j >= means.numel():
            return math.inf if lower else -math.inf
        s = torch.sort(means, descending=not lower).values
        return float(s[j])

    def lower(self, alpha: float) -> float:
        """One-sided lower confidence bound at level alpha: p_greater(d) <= alpha iff d < lower
        (Hartigan's subset means; -inf when no p can reach alpha)."""
        return self._bound(alpha, True)

    def upper(self, alpha: float) -> float:
        """One-sided upper confidence bound: p_less(d) <= alpha iff d > upper."""
        return self._bound(alpha, False)


def sign_flip(
    x,
    *,
    n_perm: int = N_PERM,
    exact_limit: int = SIGNFLIP_EXACT_LIMIT,
    generator: torch.Generator | None = None,
) -> SignFlip:
    """The sign-flip distribution of replicates x [n] (n >= 1): every pattern when 2^n <=
    max(n_perm, exact_limit), else ``n_perm`` random ones drawn with ``generator`` (CPU;
    default seeded 0)."""
    x = torch.as_tensor(x, dtype=torch.float64).detach().cpu().flatten()
    n = x.numel()
    if n < 1 or not torch.isfinite(x).all():
        raise VerdictError(f"sign_flip: need >= 1 finite replicate, got {x.tolist()}")
    exact = _is_exact(n, n_perm, exact_limit)
    if exact:
        flips = ((torch.arange(2**n)[:, None] >> torch.arange(n)) & 1).to(torch.float64)  # [2^n, n]
    else:
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        flips = (torch.rand(n_perm, n, generator=gen, dtype=torch.float64) < 0.5).to(torch.float64)
    return SignFlip(x, flips @ x, flips.sum(1), exact)



def z_upper(p: float) -> float:
    """The upper ``p`` quantile of the standard normal (0 for p <= 0)."""
    from statistics import NormalDist

    return NormalDist().inv_cdf(1 - p) if p > 0 else 0.0



def json_float(v: float):
    """JSON-safe float: NaN and +-inf -> None."""
    return float(v) if math.isfinite(v) else None
