"""End to end on the real MovieLens data: SASRec must clearly beat popularity under the same evaluator,
and a saved run must re-score to the same numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prismrec.config import load_config
from prismrec.training import Trainer, evaluate_run

REPO = Path(__file__).resolve().parents[1]
FAST = ["model.max_len=50", "model.hidden_size=64", "training.max_epochs=20", "training.lr=0.005",
        "training.batch_size=64"]


@pytest.mark.slow
def test_sasrec_beats_popularity_and_reevaluates(movielens_split, tmp_path):
    sasrec_cfg = load_config(REPO / "configs/movielens_sasrec.toml", [*FAST, "name='it-sasrec'"])
    sasrec = Trainer(sasrec_cfg, split=movielens_split, run_dir=tmp_path / "sasrec", quiet=True).fit()
    pop_cfg = load_config(None, ["model.name='popularity'", "name='it-pop'"])
    pop = Trainer(pop_cfg, split=movielens_split, run_dir=tmp_path / "pop", quiet=True).fit()

    sas_valid = sasrec.final["valid/sampled"]["ndcg@10"]
    pop_valid = pop.final["valid/sampled"]["ndcg@10"]
    assert sas_valid > pop_valid + 0.03, (sas_valid, pop_valid)
    assert sasrec.final["test/sampled"]["hit@10"] > pop.final["test/sampled"]["hit@10"]

    run = sasrec.run_dir
    for name in ("config.toml", "meta.json", "metrics.jsonl", "model.safetensors", "final.json"):
        assert (run / name).exists(), name
    meta = json.loads((run / "meta.json").read_text())
    assert meta["data_fingerprint"] == movielens_split.dataset.fingerprint
    assert meta["seed"] == 42 and "torch" in meta["packages"]
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == list(range(1, 21))

    again = evaluate_run(run)
    for key, metrics in sasrec.final.items():
        for name, value in metrics.items():
            assert again[key][name] == pytest.approx(value, abs=1e-9), (key, name)


def test_cli_train_and_evaluate_subprocess(tmp_path):
    env = {**os.environ, "PRISMREC_HOME": str(tmp_path)}
    cmd = [sys.executable, "-m", "prismrec", "train", "--config", str(REPO / "configs/movielens_sasrec.toml"),
           "--quiet", "--set", "training.max_epochs=1", "--set", "model.max_len=20", "--set",
           "model.hidden_size=16", "--set", "name='cli'"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    runs = list((tmp_path / "runs").glob("cli-*"))
    assert len(runs) == 1
    done = subprocess.run([sys.executable, "-m", "prismrec", "evaluate", str(runs[0])], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "largest difference from the recorded final.json: 0.00e+00" in done.stdout


def test_cli_reports_config_errors(tmp_path):
    env = {**os.environ, "PRISMREC_HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "prismrec", "train", "--set", "model.name='sasrec'",
                           "--set", "training.lrr=1"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "training.lrr" in done.stdout and "unknown option" in done.stdout
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
