"""Statistics over users (prismrec.evaluation.statistics) on hand-made per-user arrays."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from prismrec.evaluation.statistics import (
    bootstrap_diff_ci,
    bootstrap_mean_ci,
    compare_paired,
    minimum_detectable_difference,
    paired_tests,
    seed_averaged,
)
from prismrec.experiments.report import Row


def test_known_difference_is_found_with_its_size():
    rng = np.random.default_rng(0)
    baseline = rng.binomial(1, 0.5, size=600).astype(float)
    # The proposed method hits 90 more of the same 600 users: a difference of exactly +0.15.
    proposed = baseline.copy()
    misses = np.flatnonzero(baseline == 0)
    proposed[misses[:90]] = 1.0
    result = compare_paired(proposed, baseline)
    assert result.n_users == 600
    assert result.diff == pytest.approx(0.15)
    assert result.ci95_low < 0.15 < result.ci95_high and result.ci95_low > 0.1
    assert result.p_value < 1e-10 and result.p_value_wilcoxon < 1e-10
    assert result.p_value == pytest.approx(stats.ttest_rel(proposed, baseline).pvalue)
    assert result.p_value_wilcoxon == pytest.approx(stats.wilcoxon(proposed, baseline).pvalue)
    assert 0 < result.min_detectable_diff < 0.15


def test_zero_mean_difference_is_not_significant():
    rng = np.random.default_rng(1)
    baseline = rng.random(500)
    # Half the users gain exactly what the other half lose: the mean difference is 0 but users differ.
    delta = np.where(np.arange(500) % 2 == 0, 0.2, -0.2)
    proposed = baseline + delta
    result = compare_paired(proposed, baseline)
    assert result.diff == pytest.approx(0.0, abs=1e-12)
    assert result.p_value == pytest.approx(1.0) and result.p_value_wilcoxon > 0.5
    assert result.ci95_low < 0.0 < result.ci95_high
    # The smallest detectable difference follows the spread of the differences (sd 0.2 over 500 users).
    expected = (stats.norm.ppf(0.975) + stats.norm.ppf(0.8)) * np.std(delta, ddof=1) / np.sqrt(500)
    assert result.min_detectable_diff == pytest.approx(expected)
    assert minimum_detectable_difference(proposed, baseline) == pytest.approx(expected)


def test_identical_arrays_give_no_evidence_and_a_point_interval():
    values = np.random.default_rng(2).random(100)
    assert paired_tests(values, values.copy()) == (1.0, 1.0)
    assert bootstrap_diff_ci(values, values.copy()) == (0.0, 0.0)
    result = compare_paired(values, values.copy())
    assert result.diff == 0.0 and result.min_detectable_diff == 0.0


def test_bootstrap_interval_is_seeded_and_covers_the_mean():
    values = np.random.default_rng(3).binomial(1, 0.3, size=610).astype(float)
    first = bootstrap_mean_ci(values, resamples=2000, seed=7)
    assert first == bootstrap_mean_ci(values, resamples=2000, seed=7)
    assert first != bootstrap_mean_ci(values, resamples=2000, seed=8)
    low, high = first
    assert low < values.mean() < high
    # Close to the normal interval p +- 1.96 sqrt(p (1 - p) / n) for a mean of 0/1 values.
    half = 1.96 * np.sqrt(values.mean() * (1 - values.mean()) / len(values))
    assert (high - low) / 2 == pytest.approx(half, rel=0.1)


def test_seed_averaging_aligns_users_and_refuses_other_users():
    users = np.array([3, 1, 2])
    seed_a = (users, np.array([1.0, 0.0, 1.0]))
    seed_b = (np.array([1, 2, 3]), np.array([1.0, 0.0, 0.0]))  # same users, another order
    averaged_users, averaged = seed_averaged([seed_a, seed_b])
    assert averaged_users.tolist() == [1, 2, 3]
    assert averaged.tolist() == [0.5, 0.5, 0.5]
    with pytest.raises(ValueError, match="other test users"):
        seed_averaged([seed_a, (np.array([1, 2, 4]), np.zeros(3))])


def test_bad_pairs_are_refused():
    with pytest.raises(ValueError, match="align"):
        compare_paired(np.ones(3), np.ones(4))
    with pytest.raises(ValueError, match="empty"):
        compare_paired(np.array([]), np.array([]))


def test_rows_from_before_user_statistics_lose_their_p_values():
    old = {"backbone": "sasrec", "method": "DMESR", "metric": "hit@10", "mode": "sampled", "mean": 0.7, "std": 0.01,
           "paper": 0.85, "p_value": 1e-9, "n_seeds": 3, "best_baseline": "None"}
    row = Row.from_json(old)
    assert row.p_value is None and not row.has_user_statistics
    new = {**old, "n_users": 610, "p_value_wilcoxon": 0.02, "ci95_low": 0.68, "ci95_high": 0.72, "p_value": 0.03}
    row = Row.from_json(new)
    assert row.p_value == 0.03 and row.n_users == 610 and row.to_json()["ci95_high"] == 0.72


def _cell_result(tmp_path, method: str, seed: int, axes: tuple, hits: np.ndarray, users: np.ndarray):
    """A finished cell as the report reads it: final.json metrics and per-user arrays in a real folder."""
    from safetensors.numpy import save_file

    from prismrec.experiments.runner import PER_USER_FILE, CellResult
    from prismrec.experiments.spec import Cell

    folder = tmp_path / f"{method}-{'-'.join(f'{k}{v}' for k, v in axes)}-s{seed}"
    folder.mkdir()
    arrays = {}
    for mode in ("sampled", "full"):
        arrays[f"test/{mode}/users"] = users.astype(np.int64)
        arrays[f"test/{mode}/hit@10"] = hits.astype(np.float64)
        arrays[f"test/{mode}/longtail"] = (users % 3 == 0).astype(np.uint8)
    save_file(arrays, str(folder / PER_USER_FILE))
    final = {"metrics": {f"test/{mode}": {"hit@10": float(hits.mean())} for mode in ("sampled", "full")}}
    return CellResult(Cell(method, "sasrec", seed, axes, None), folder, final, 1.0, True)  # type: ignore[arg-type]


def _spec(methods: list[dict], axes: list[dict] | None = None):
    from prismrec.experiments.spec import ExperimentSpec

    return ExperimentSpec.model_validate({"name": "hand", "proposed": methods[-1]["name"], "metrics": ["hit@10"],
                                          "test_metrics": ["hit@10"], "methods": methods,
                                          "backbones": [{"name": "sasrec"}], "axes": axes or []})


def test_report_pairs_users_after_averaging_seeds(tmp_path):
    """The proposed method's p-value is over the 300 users (seed-averaged), not over seeds x users."""
    from prismrec.experiments.report import build_rows

    rng = np.random.default_rng(4)
    users = rng.permutation(np.arange(1, 301))
    base = {seed: rng.binomial(1, 0.5, size=300).astype(float) for seed in (1, 2, 3)}
    ours = {seed: np.where(rng.random(300) < 0.1, 1.0, base[seed]) for seed in (1, 2, 3)}
    results = [_cell_result(tmp_path, "None", s, (), base[s], users) for s in (1, 2, 3)]
    # The proposed method's cells list their users in another order: pairing is by user id.
    order = np.argsort(users)
    results += [_cell_result(tmp_path, "Ours", s, (), ours[s][order], users[order]) for s in (1, 2, 3)]
    spec = _spec([{"name": "None", "config": "x.toml"}, {"name": "Ours", "config": "x.toml"}])
    rows = build_rows(spec, results, "movielens-small", resamples=500)
    row = next(r for r in rows if (r.method, r.mode, r.subset) == ("Ours", "sampled", "all"))
    averaged_ours = np.mean([ours[s] for s in (1, 2, 3)], axis=0)
    averaged_base = np.mean([base[s] for s in (1, 2, 3)], axis=0)
    assert row.n_users == 300 and row.best_baseline == "None" and row.test_seeds == [1, 2, 3]
    assert row.p_value == pytest.approx(stats.ttest_rel(averaged_ours, averaged_base).pvalue)
    assert row.p_value_wilcoxon == pytest.approx(stats.wilcoxon(averaged_ours, averaged_base).pvalue)
    concatenated = stats.ttest_rel(np.concatenate([ours[s] for s in (1, 2, 3)]),
                                   np.concatenate([base[s] for s in (1, 2, 3)])).pvalue
    assert row.p_value > concatenated  # seeds x users pairs overstate the evidence
    assert row.diff_vs_baseline == pytest.approx(float((averaged_ours - averaged_base).mean()))
    assert row.diff_ci95_low < row.diff_vs_baseline < row.diff_ci95_high
    assert row.ci95_low < row.mean < row.ci95_high
    tail = next(r for r in rows if (r.method, r.mode, r.subset) == ("Ours", "sampled", "longtail"))
    assert tail.n_users == int((users % 3 == 0).sum())
    baseline_row = next(r for r in rows if (r.method, r.mode, r.subset) == ("None", "sampled", "all"))
    assert baseline_row.p_value is None and baseline_row.n_users == 300


def test_sweep_settings_are_compared_with_the_best_other_setting(tmp_path):
    from prismrec.experiments.report import build_rows

    users = np.arange(1, 201)
    rng = np.random.default_rng(5)
    hits = {0.1: rng.binomial(1, 0.4, 200).astype(float), 0.5: rng.binomial(1, 0.6, 200).astype(float),
            1.0: rng.binomial(1, 0.5, 200).astype(float)}
    results = [_cell_result(tmp_path, "Ours", s, (("alpha", a),), hits[a], users) for a in hits for s in (1, 2)]
    spec = _spec([{"name": "Ours", "config": "x.toml"}], [{"name": "alpha", "key": "model.alpha",
                                                            "values": [0.1, 0.5, 1.0]}])
    rows = {r.axes["alpha"]: r for r in build_rows(spec, results, "movielens-small", resamples=300)
            if (r.mode, r.subset) == ("sampled", "all")}
    best = max(hits, key=lambda a: hits[a].mean())
    for alpha, row in rows.items():
        others = [a for a in hits if a != alpha]
        reference = max(others, key=lambda a: hits[a].mean())
        assert row.reference_axes == {"alpha": reference}
        assert row.p_value == pytest.approx(stats.ttest_rel(hits[alpha], hits[reference]).pvalue)
        assert (row.diff_vs_baseline > 0) == (alpha == best)
