"""Resumable training: a run killed with SIGKILL mid-epoch and resumed with ``prismrec train --resume``
ends with exactly the metrics of the same run left alone. Checkpoints hold no pickle."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from prismrec.config import load_config
from prismrec.training import Trainer
from prismrec.training.checkpoint import CheckpointError, load_training_state

REPO = Path(__file__).resolve().parents[1]
SETTINGS = ["model.max_len=30", "model.hidden_size=32", "training.max_epochs=6", "training.num_threads=1",
            "training.lr=0.005", "evaluation.full_ranking=false", "name='resume'"]


def _train_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "prismrec", "train", "--quiet", *args]


def test_kill_9_mid_epoch_then_resume_matches_uninterrupted(movielens_split, tmp_path):
    home = tmp_path / "home"
    env = {**os.environ, "PRISMREC_HOME": str(home)}
    sets = [arg for s in SETTINGS for arg in ("--set", s)]
    proc = subprocess.Popen(_train_cmd("--config", str(REPO / "configs/movielens_sasrec.toml"), *sets), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    run_dir = None
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            runs = list((home / "runs").glob("resume-*")) if (home / "runs").exists() else []
            log = runs[0] / "metrics.jsonl" if runs else None
            if log is not None and log.exists() and len(log.read_text().splitlines()) >= 2:
                run_dir = runs[0]
                break
            time.sleep(0.02)
        assert run_dir is not None and proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)  # epoch 3 has just started
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run_dir / "final.json").exists()
    killed_at = load_training_state(run_dir / "last.safetensors").epoch
    assert 2 <= killed_at < 6

    done = subprocess.run(_train_cmd("--resume", str(run_dir)), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"resumed after epoch {killed_at}" in " ".join(done.stdout.split())
    resumed = json.loads((run_dir / "final.json").read_text())
    assert resumed["resumed_from_epoch"] == killed_at
    epochs = [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3, 4, 5, 6]  # each epoch logged once, none lost to the kill
    meta = json.loads((run_dir / "meta.json").read_text())
    assert len(meta["resumed"]) == 1

    config = load_config(REPO / "configs/movielens_sasrec.toml", SETTINGS)
    alone = Trainer(config, split=movielens_split, run_dir=tmp_path / "alone", quiet=True).fit()
    assert resumed["metrics"] == alone.final
    assert resumed["best_epoch"] == alone.best_epoch
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert losses == [r["loss"] for r in alone.history]


class CrashingTrainer(Trainer):
    """Dies part-way into epoch ``crash_in`` after disturbing its in-memory state (weights, generators)."""

    crash_in = 3

    def _epoch(self, step, optimizer, users):
        self.epochs_started = getattr(self, "epochs_started", 0) + 1
        if self.epochs_started == self.crash_in:
            with torch.no_grad():
                for param in self.model.parameters():
                    param.add_(1.0)
            self.order_rng.random(10)
            raise RuntimeError("simulated crash")
        return super()._epoch(step, optimizer, users)


def test_checkpoint_is_safetensors_with_json_state_and_resumes_in_process(movielens_split, tmp_path):
    config = load_config(None, ["model.max_len=20", "model.hidden_size=16", "model.name='bert4rec'",
                                "training.max_epochs=3", "training.num_threads=1", "evaluation.full_ranking=false",
                                "training.loss='ce'", "training.lr=0.005"])
    alone = Trainer(config, split=movielens_split, run_dir=tmp_path / "alone", quiet=True).fit()
    with pytest.raises(RuntimeError, match="simulated crash"):
        CrashingTrainer(config, split=movielens_split, run_dir=tmp_path / "part", quiet=True).fit()
    path = tmp_path / "part" / "last.safetensors"
    with safe_open(str(path), framework="pt") as handle:  # plain safetensors: tensors + a JSON document
        document = json.loads(handle.metadata()["prismrec_training_state"])
        rng = handle.get_tensor("rng.torch_cpu.0")
        assert any(key.startswith("optimizer.") for key in handle.keys())
    assert rng.dtype == torch.uint8
    assert document["numpy_rng"][0]["order"]["bit_generator"] == "PCG64"
    assert document["epoch"] == 2 and not document["finished"] and document["early_stopping"]["best_epoch"] >= 1
    resumed = Trainer(config, split=movielens_split, run_dir=tmp_path / "part", quiet=True, resume=True).fit()
    assert resumed.resumed_from_epoch == 2
    assert resumed.final == alone.final
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in alone.history]


def test_resume_refuses_a_changed_config_or_extra_options(movielens_split, tmp_path):
    config = load_config(None, ["model.name='gru4rec'", *SETTINGS[:2], "training.max_epochs=1",
                                "evaluation.full_ranking=false"])
    Trainer(config, split=movielens_split, run_dir=tmp_path / "run", quiet=True).fit()
    changed = load_config(None, ["model.name='gru4rec'", *SETTINGS[:2], "training.max_epochs=1",
                                 "evaluation.full_ranking=false", "training.lr=0.5"])
    with pytest.raises(CheckpointError, match="no longer matches"):
        Trainer(changed, split=movielens_split, run_dir=tmp_path / "run", quiet=True, resume=True)
    env = {**os.environ, "PRISMREC_HOME": str(tmp_path)}
    done = subprocess.run(_train_cmd("--resume", str(tmp_path / "run"), "--set", "training.lr=0.1"), env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--resume takes the configuration saved" in " ".join(done.stdout.split())
