"""Small-sample statistics for the demo's comparisons (pure Python; no scipy needed).

    mean_ci(xs)               mean and two-sided 95% Student-t interval
    paired_t(xs, ys)          paired t-test of mean(x - y) = 0: (t, two-sided p)
    sign_flip_p(xs, ys)       exact paired sign-flip permutation test: two-sided p
"""

from __future__ import annotations

import itertools
import math
import statistics


def _betacf(a: float, b: float, x: float) -> float:
    # continued fraction of the incomplete beta function (modified Lentz)
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbt = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(lbt) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lbt) * _betacf(b, a, 1.0 - x) / b


def t_sf2(t: float, df: int) -> float:
    """Two-sided tail P(|T| >= |t|) of Student's t with df degrees of freedom."""
    if math.isinf(t):
        return 0.0
    return _betainc(df / 2.0, 0.5, df / (df + t * t))


def t_quantile(q: float, df: int) -> float:
    """The q quantile (q > 0.5) of Student's t, by bisection on the tail."""
    lo, hi = 0.0, 1e3
    for _ in range(200):
        mid = (lo + hi) / 2
        if t_sf2(mid, df) / 2 > 1 - q:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def mean_ci(xs: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the Student-t interval; one value gives a zero-width interval."""
    m = statistics.fmean(xs)
    if len(xs) < 2:
        return m, m, m
    half = t_quantile(0.5 + level / 2, len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))
    return m, m - half, m + half


def paired_t(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """(t, two-sided p) for mean(x - y) = 0 on paired values; all differences equal 0 gives (0, 1)."""
    if len(xs) != len(ys) or len(xs) < 2:
        raise ValueError(f"paired_t needs two paired lists of 2+ values; got {len(xs)} and {len(ys)}")
    d = [x - y for x, y in zip(xs, ys)]
    sd = statistics.stdev(d)
    m = statistics.fmean(d)
    if sd == 0:
        return (0.0, 1.0) if m == 0 else (math.copysign(math.inf, m), 0.0)
    t = m / (sd / math.sqrt(len(d)))
    return t, t_sf2(t, len(d) - 1)


def sign_flip_p(xs: list[float], ys: list[float]) -> float:
    """Exact two-sided sign-flip permutation p for the mean paired difference (2^n flips; with n
    pairs the smallest possible p is 2 / 2^n, e.g. 0.0625 for 5 seeds)."""
    if len(xs) != len(ys) or not xs:
        raise ValueError(f"sign_flip_p needs two paired non-empty lists; got {len(xs)} and {len(ys)}")
    d = [x - y for x, y in zip(xs, ys)]
    obs = abs(sum(d)) - 1e-12
    hits = sum(abs(sum(s * v for s, v in zip(signs, d))) >= obs
               for signs in itertools.product((1, -1), repeat=len(d)))
    return hits / 2 ** len(d)
