"""benchmarks/llm_recommenders.py end to end at its ``--smoke`` size: tiny data, a tiny random LM, every step
(SASRec, MLLM-MSR with summaries, Speeder, bootstrap report) run for real, then resumed from its work directory."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import torch

from llm_fixtures import save_tiny_causal_lm
from prismrec.data import load_sequences
from semantics_fixtures import write_artefact

from conftest import write_movielens

REPO = Path(__file__).resolve().parents[1]


def _load_benchmark():
    sys.path.insert(0, str(REPO / "benchmarks"))  # the script imports its sibling _common
    spec = importlib.util.spec_from_file_location("benchmark_llm_recommenders", REPO / "benchmarks" /
                                                  "llm_recommenders.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_llm_recommenders_smoke_runs_every_step_and_resumes(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    lines = ["userId,movieId,rating,timestamp"]
    for user in range(1, 17):
        movies = rng.choice(np.arange(1, 40), size=int(rng.integers(8, 12)), replace=False)
        lines += [f"{user},{movie},4.0,{1000 * user + step}" for step, movie in enumerate(movies)]
    write_movielens(tmp_path / "data", "\n".join(lines) + "\n")
    dataset = load_sequences("movielens-small", tmp_path / "data")
    artefact = write_artefact(tmp_path / "artefact", [str(i) for i in dataset.item_ids[1:]])
    model = save_tiny_causal_lm(tmp_path / "tiny")
    benchmark = _load_benchmark()
    argv = ["--smoke", "--data-dir", str(tmp_path / "data"), "--model", str(model), "--semantics", str(artefact),
            "--image-matrix", "visual", "--no-item-summaries", "--threads", "1", "--quiet",
            "--work-dir", str(tmp_path / "work"), "--results-dir", str(tmp_path / "results")]
    flat = benchmark.main(argv)

    written = json.loads((tmp_path / "results" / "llm_recommenders_smoke.json").read_text())
    assert written == json.loads(json.dumps(flat))
    for key in ("mllm_msr_hit10", "mllm_msr_hit10_ci_low", "speeder_hit10", "speeder_hit10_ci_low",
                "popularity_hit10", "sasrec_hit10", "chance_hit10", "n_users", "train_samples_mllm_msr",
                "train_samples_speeder"):
        assert key in written, key
    assert written["n_users"] == 6 and written["chance_hit10"] == 10 / 21
    assert written["train_samples_mllm_msr"] == 4 * 2 and written["train_samples_speeder"] >= 48
    for name in ("mllm_msr", "speeder", "sasrec", "popularity"):
        assert 0.0 <= written[f"{name}_hit10_ci_low"] <= written[f"{name}_hit10"] <= written[f"{name}_hit10_ci_high"]
    report = (tmp_path / "results" / "llm_recommenders_smoke.md").read_text()
    assert "SMOKE" in report and "benchmarks/llm_recommenders.py --smoke" in report
    work = tmp_path / "work"
    for done in ("sasrec/final.json", "mllm_msr/adapter/adapter.safetensors", "mllm_msr/test_scores.npy",
                 "speeder/best.safetensors", "speeder/test_scores.npy", "summaries.sqlite"):
        assert (work / done).exists(), done

    # a rerun reuses every finished training and score (the saved scores come back unchanged)
    mtimes = {p: p.stat().st_mtime_ns for p in work.rglob("*.npy")}
    again = benchmark.main(argv)
    assert {p: p.stat().st_mtime_ns for p in work.rglob("*.npy")} == mtimes
    assert {k: v for k, v in again.items() if k != "total_seconds"} == \
        {k: v for k, v in flat.items() if k != "total_seconds"}
