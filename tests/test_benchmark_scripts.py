"""The report-merging part of the benchmark scripts (the measurements themselves are run by hand, not here)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_backbones_keep_existing_carries_the_rows_of_backbones_not_rerun(tmp_path):
    backbones = _load("backbones")
    # The committed report itself: two invocations already joined by --keep-existing.
    for suffix in ("md", "json"):
        shutil.copy(REPO / "benchmarks" / "results" / f"backbones.{suffix}", tmp_path / f"backbones.{suffix}")
    committed = json.loads((tmp_path / "backbones.json").read_text())

    kept = backbones.kept_rows(tmp_path, {"bert4rec"})
    assert kept.names == ["gru4rec", "sasrec"]
    assert kept.summary["sasrec_sampled_ndcg10_mean"] == committed["sasrec_sampled_ndcg10_mean"]
    assert not any(key.startswith("bert4rec_") for key in kept.summary)
    assert {line.split("|")[1].strip() for line in kept.lines["summary"]} == {"sasrec", "gru4rec"}
    assert len(kept.lines["runs"]) == committed["sasrec_seeds"] + committed["gru4rec_seeds"]
    assert sorted(line.split(":")[0] for line in kept.lines["settings"]) == ["- gru4rec", "- sasrec"]
    # Both earlier commands are carried, so the merged report still says how every row was made.
    assert len(kept.commands) == 2 and all("benchmarks/backbones.py" in c for c in kept.commands)

    assert backbones.kept_rows(tmp_path / "missing", {"sasrec"}) is None


def test_scale_data_is_seeded_exact_and_loads_as_generic(tmp_path):
    scale = _load("scale")
    from prismrec.data.loaders import load_sequences

    shape = scale.generate(tmp_path / "data" / "scale-x", 5000, seed=0)
    again = scale.generate(tmp_path / "again" / "scale-x", 5000, seed=0)
    assert shape == again and shape["interactions"] == 5000 and shape["items"] == 100
    assert (tmp_path / "data/scale-x/interactions.parquet").read_bytes() == (
        tmp_path / "again/scale-x/interactions.parquet").read_bytes()
    options = {"interactions_file": "interactions.parquet", "items_file": "items.parquet"}
    sequences = load_sequences("generic", tmp_path / "data", options=options, folder="scale-x")
    assert sum(len(s) for s in sequences.sequences) == 5000 and sequences.n_users == shape["users"]
    assert min(len(s) for s in sequences.sequences) >= 3
    counts = {}
    for seq in sequences.sequences:
        for item in seq:
            key = str(sequences.item_ids[item])
            counts[key] = counts.get(key, 0) + 1
    assert counts["i0"] > 5 * counts.get("i99", 0)  # Zipf: the head item is far more popular than the tail
    # nested catalogues: item i has the same text at every size
    small, large = scale.item_table(10), scale.item_table(100)
    assert all(small[c] == large[c][:10] for c in small)


def test_scale_summary_judges_the_goals():
    scale = _load("scale")
    part = {"users": 10, "items": 5, "load_s": 1.0, "peak_rss_gb": 2.0, "threads": 2}
    model = {"setup_s": 1.0, "epoch_s": 10.0, "epoch_s_per_m": 10.0, "eval_s": 30.0, "eval_sampled_s": 20.0,
             "eval_full_s": 10.0, "full_ranking": {"users": 10, "of": 10}, "rss_gb": 2.0,
             "test_sampled_ndcg10": 0.1, "test_full_ndcg10": 0.01, "batches_measured": 5, "batches_per_epoch": 5}
    parts = {"1m": {**part, "sasrec": model},
             "10m": {**part, "peak_rss_gb": 9.0, "sasrec": {**model, "epoch_s_per_m": 14.0, "eval_s": 700.0}}}
    flat, table = scale.summarise(parts, ["sasrec"], None)
    assert flat["epoch_s_per_m_1m"] == 10.0 and flat["epoch_s_per_m_10m"] == 14.0
    assert flat["cost_ratio_10m_vs_1m"] == 1.4 and flat["eval_s_10m"] == 700.0 and flat["peak_rss_gb_10m"] == 9.0
    assert table.count("NOT met") == 3
