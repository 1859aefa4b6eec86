"""Statistics over users: the unit the evaluation sampled.

A report compares methods on the same test users. Each user's metric is a measurement of that user; seeds
re-measure the *same* users, so they are averaged per user first (:func:`seed_averaged`) and every test and
interval below runs over users, with ``n`` = the number of test users. Treating seeds x users as independent
pairs counts each user once per seed and makes p-values too small.

- :func:`paired_tests`: two-sided paired t-test (:func:`scipy.stats.ttest_rel`) and Wilcoxon signed-rank test
  (:func:`scipy.stats.wilcoxon`, zero differences dropped, its default "wilcox" rule) over users.
- :func:`bootstrap_mean_ci`, :func:`bootstrap_diff_ci`: percentile bootstrap over users (resample users with
  replacement, seeded, 2,000 resamples by default), 95% intervals.
- :func:`minimum_detectable_difference`: the smallest true mean difference the paired t-test finds with
  80% power at alpha = 0.05 given the spread of the per-user differences, ``(z_0.975 + z_0.8) * sd / sqrt(n)``.
- :func:`compare_paired`: all of it for "proposed minus baseline" in one :class:`PairedComparison`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

RESAMPLES = 2000
CI_LEVEL = 0.95
ALPHA = 0.05
POWER = 0.8


def _as_pair(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"paired samples must align: two 1-d arrays over the same users: {a.shape} vs {b.shape}")
    if not len(a):
        raise ValueError("paired samples are empty: no users to compare")
    return a, b


def paired_t_test(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Two-sided paired t-test p-value over users. 1.0 when no user differs (no evidence); 0.0 when every user
    differs by the same non-zero amount (no spread: the t statistic is infinite)."""
    a, b = _as_pair(a, b)
    diff = a - b
    if np.allclose(diff, 0.0):
        return 1.0
    if len(diff) < 2 or np.allclose(diff, diff[0]):
        return 0.0
    return float(stats.ttest_rel(a, b).pvalue)


def wilcoxon_test(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p-value over users (users with a zero difference are dropped, the
    "wilcox" rule); 1.0 when no user differs."""
    a, b = _as_pair(a, b)
    if np.allclose(a - b, 0.0):
        return 1.0
    return float(stats.wilcoxon(a, b, zero_method="wilcox", alternative="two-sided").pvalue)


def paired_tests(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """(t-test p, Wilcoxon p), both two-sided, over users."""
    return paired_t_test(a, b), wilcoxon_test(a, b)


def _bootstrap_means(values: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """Means of ``resamples`` bootstrap samples of ``values`` (users drawn with replacement)."""
    rng = np.random.default_rng(seed)
    n = len(values)
    means = np.empty(resamples, dtype=np.float64)
    # Chunks keep the index matrix small for large user counts (10^5 users x 2,000 resamples).
    chunk = max(1, 2_000_000 // max(n, 1))
    for start in range(0, resamples, chunk):
        stop = min(resamples, start + chunk)
        means[start:stop] = values[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    return means


def bootstrap_mean_ci(values: Sequence[float] | np.ndarray, resamples: int = RESAMPLES, seed: int = 0,
                      level: float = CI_LEVEL) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean over users."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or not len(values):
        raise ValueError(f"need a non-empty 1-d array of per-user values, got shape {values.shape}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    means = _bootstrap_means(values, resamples, seed)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def bootstrap_diff_ci(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, resamples: int = RESAMPLES,
                      seed: int = 0, level: float = CI_LEVEL) -> tuple[float, float]:
    """Percentile bootstrap interval of mean(a - b), users resampled as pairs."""
    a, b = _as_pair(a, b)
    return bootstrap_mean_ci(a - b, resamples, seed, level)


def minimum_detectable_difference(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray,
                                  alpha: float = ALPHA, power: float = POWER) -> float:
    """Smallest true mean difference a two-sided paired test at ``alpha`` detects with ``power`` over these
    users (normal approximation, the spread of the observed per-user differences)."""
    a, b = _as_pair(a, b)
    if len(a) < 2:
        return float("inf")
    sd = float(np.std(a - b, ddof=1))
    return float((stats.norm.ppf(1.0 - alpha / 2.0) + stats.norm.ppf(power)) * sd / np.sqrt(len(a)))


def seed_averaged(per_seed: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """(users, values) of several seeds -> (users, per-user mean over seeds).

    Every seed must have scored the same users (the split does not depend on the seed); users are returned
    sorted."""
    if not per_seed:
        raise ValueError("no seeds to average")
    users0 = np.asarray(per_seed[0][0])
    order0 = np.argsort(users0, kind="stable")
    users = users0[order0]
    total = np.zeros(len(users), dtype=np.float64)
    for i, (seed_users, seed_values) in enumerate(per_seed):
        seed_users, seed_values = np.asarray(seed_users), np.asarray(seed_values, dtype=np.float64)
        if seed_users.shape != seed_values.shape:
            raise ValueError(f"seed {i}: {len(seed_users)} users but {len(seed_values)} values")
        order = np.argsort(seed_users, kind="stable")
        if not np.array_equal(seed_users[order], users):
            raise ValueError(f"seed {i} scored other test users than seed 0 ({len(seed_users)} vs {len(users)}): "
                             "per-user metrics cannot be averaged over seeds")
        total += seed_values[order]
    return users, total / len(per_seed)


@dataclass(frozen=True)
class PairedComparison:
    """"a minus b" over the same users: means, difference with its bootstrap interval, both tests, and the
    smallest difference these users could reveal."""

    n_users: int
    mean_a: float
    mean_b: float
    diff: float
    ci95_low: float
    ci95_high: float
    p_value: float
    p_value_wilcoxon: float
    min_detectable_diff: float

    def to_json(self) -> dict[str, float | int]:
        return asdict(self)


def compare_paired(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, resamples: int = RESAMPLES,
                   seed: int = 0) -> PairedComparison:
    a, b = _as_pair(a, b)
    low, high = bootstrap_diff_ci(a, b, resamples, seed)
    p_t, p_w = paired_tests(a, b)
    return PairedComparison(n_users=len(a), mean_a=float(a.mean()), mean_b=float(b.mean()),
                            diff=float((a - b).mean()), ci95_low=low, ci95_high=high, p_value=p_t,
                            p_value_wilcoxon=p_w, min_detectable_diff=minimum_detectable_difference(a, b))
