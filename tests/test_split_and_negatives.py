from __future__ import annotations

import numpy as np

from prismrec.data import load_sequences
from prismrec.data.split import LeaveOneOutSplit
from prismrec.evaluation import SampledRankingEvaluator, sample_negatives

from conftest import write_movielens


def test_leave_one_out(tmp_path):
    rows = ["userId,movieId,rating,timestamp"]
    rows += [f"1,{i},4,{i}" for i in (10, 11, 12, 13, 14)]
    rows += ["2,20,4,1", "2,21,4,2"]  # too short to evaluate: training only
    write_movielens(tmp_path, "\n".join(rows) + "\n", "movieId,title,genres\n" + "".join(
        f"{i},M{i},Drama\n" for i in range(1, 30)))
    split = LeaveOneOutSplit(load_sequences("movielens-small", tmp_path))
    ids = split.dataset.item_ids
    assert split.dataset.user_ids[split.eval_users].tolist() == ["1"]
    u1 = int(split.eval_users[0])
    assert [ids[i] for i in split.train_sequence(u1)] == ["10", "11", "12"]
    hist, target = split.inputs_and_target(u1, "valid")
    assert [ids[i] for i in hist] == ["10", "11", "12"] and ids[target] == "13"
    hist, target = split.inputs_and_target(u1, "test")
    assert [ids[i] for i in hist] == ["10", "11", "12", "13"] and ids[target] == "14"
    u2 = int(split.train_only_users[0])
    assert [ids[i] for i in split.train_sequence(u2)] == ["20", "21"]


def test_negatives_never_in_history_and_seeded(movielens_split):
    ds = movielens_split.dataset
    negs = sample_negatives(ds.sequences, ds.n_items, 100, seed=7)
    assert negs.shape == (ds.n_users, 100)
    for user, seq in enumerate(ds.sequences):
        row = negs[user]
        assert len(np.unique(row)) == 100
        assert not np.isin(row, seq).any()
        assert row.min() >= 1 and row.max() <= ds.n_items
    assert np.array_equal(negs, sample_negatives(ds.sequences, ds.n_items, 100, seed=7))
    assert not np.array_equal(negs, sample_negatives(ds.sequences, ds.n_items, 100, seed=8))


def test_sampled_candidates_are_saved_once_and_reused(movielens_split, tmp_path):
    first = SampledRankingEvaluator(movielens_split, seed=11, cache_dir=tmp_path)
    path = first.cache_path(tmp_path)
    assert path.exists()
    stamp = path.stat().st_mtime_ns
    second = SampledRankingEvaluator(movielens_split, seed=11, cache_dir=tmp_path)
    assert path.stat().st_mtime_ns == stamp
    assert np.array_equal(first.negatives, second.negatives)
