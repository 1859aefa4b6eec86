"""``training.window = "sliding"``: every training transition is a target once per epoch, not only the last max_len."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

from prismrec.config import load_config
from prismrec.training import Trainer
from prismrec.training.trainer import sliding_windows

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.max_len=20", "model.hidden_size=16", "training.max_epochs=1", "training.num_threads=1",
        "evaluation.full_ranking=false"]


def _transitions(rows: list[np.ndarray]) -> list[tuple[int, int]]:
    return sorted((int(a), int(b)) for row in rows for a, b in itertools.pairwise(row))


def test_windows_cover_every_transition_once():
    sequences = [np.arange(1, 13), np.arange(20, 23), np.array([30]), np.arange(40, 46)]
    rows = sliding_windows(sequences, max_len=5)
    assert all(2 <= len(r) <= 6 for r in rows)
    assert _transitions(rows) == _transitions(sequences)  # each (item, next item) exactly once
    assert [list(r) for r in rows[:3]] == [[7, 8, 9, 10, 11, 12], [2, 3, 4, 5, 6, 7], [1, 2]]  # from the end


def test_sliding_trainer_uses_the_whole_history_and_keeps_old_hashes(movielens_split, tmp_path):
    last = load_config(REPO / "configs/movielens_sasrec.toml", TINY)
    sliding = load_config(REPO / "configs/movielens_sasrec.toml", [*TINY, 'training.window="sliding"'])
    # The default is left out of the hash, so runs recorded before the option existed are still recognised.
    assert last.config_hash() == load_config(REPO / "configs/movielens_sasrec.toml",
                                             [*TINY, 'training.window="last"']).config_hash()
    assert sliding.config_hash() != last.config_hash()

    trainer = Trainer(sliding, split=movielens_split, run_dir=tmp_path / "s", quiet=True)
    train = movielens_split.train_sequences
    assert len(trainer.train_rows) > len(train)
    assert max(len(r) for r in trainer.train_rows) == 21
    assert _transitions(trainer.train_rows) == _transitions(train)
    result = trainer.fit()
    assert np.isfinite(result.history[0]["loss"]) and result.final["test/sampled"]["hit@10"] > 0
    assert len(Trainer(last, split=movielens_split, run_dir=tmp_path / "l", quiet=True).train_rows) == len(train)
