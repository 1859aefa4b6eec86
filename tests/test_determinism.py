"""Same seed, same config, same machine -> identical metrics (and identical losses, epoch by epoch)."""

from __future__ import annotations

from pathlib import Path

import pytest

from prismrec.config import load_config
from prismrec.training import Trainer

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.max_len=20", "model.hidden_size=16", "training.max_epochs=2", "training.num_threads=1",
        "training.lr=0.005", "evaluation.full_ranking=false"]


@pytest.mark.parametrize("model", ["sasrec", "bert4rec", "gru4rec"])
def test_same_seed_same_metrics(model, movielens_split, tmp_path):
    config = load_config(REPO / f"configs/movielens_{model}.toml", TINY)
    first = Trainer(config, split=movielens_split, run_dir=tmp_path / "a", quiet=True).fit()
    second = Trainer(config, split=movielens_split, run_dir=tmp_path / "b", quiet=True).fit()
    assert [r["loss"] for r in first.history] == [r["loss"] for r in second.history]
    assert first.final == second.final
    reseeded = load_config(REPO / f"configs/movielens_{model}.toml", [*TINY, "seed=7", "training.max_epochs=1"])
    other = Trainer(reseeded, split=movielens_split, run_dir=tmp_path / "c", quiet=True).fit()
    assert other.history[0]["loss"] != first.history[0]["loss"]  # the seed is used
