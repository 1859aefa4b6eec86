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
