"""Bounded, streaming full ranking: identical to the dense computation on the real MovieLens data, and bounded.

The dense reference (:class:`DenseFullRankingEvaluator`) is what full ranking computed before it streamed: one
(batch x catalogue) score matrix and validity mask. The streamed one scores chunks of the catalogue with the
same matrix products, so every user's rank must be *equal*, not close, for every model kind (including
popularity, whose scores are full of ties).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from prismrec.config import load_config
from prismrec.evaluation import (
    DenseFullRankingEvaluator,
    FullRankingEvaluator,
    chunked_full_ranking,
    full_ranking_sample,
    pad_left,
)
from prismrec.evaluation.evaluators import ScoreFactors
from prismrec.models import MODELS
from prismrec.options import ConfigError
from prismrec.training import Trainer
from semantics_fixtures import write_artefact

SMALL = {"hidden_size": 32, "max_len": 50, "dropout": 0.2}


def _trained(name: str, split, **options):
    """A model after 15 training steps on MovieLens (trained weights, not an initialisation)."""
    cls = MODELS.get(name)
    torch.manual_seed(0)
    model = cls.build(cls.Config(**options), split)
    if not model.trainable:
        return model.eval()
    rng = np.random.default_rng(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    model.train()
    for _ in range(15):
        users = rng.choice(len(split.train_sequences), 64, replace=False)
        loss = model.training_loss(model.training_batch([split.train_sequences[u] for u in users], rng), "bce")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def movielens_artefact(movielens_split, tmp_path_factory) -> Path:
    items = [str(i) for i in movielens_split.dataset.item_ids[1:]]
    return write_artefact(tmp_path_factory.mktemp("ml-art"), items, dim=24)


@pytest.mark.parametrize("name", ["sasrec", "gru4rec", "bert4rec", "dmesr", "popularity"])
def test_streamed_ranks_equal_the_dense_ones_on_movielens(name, movielens_split, movielens_artefact):
    split = movielens_split
    options = {} if name == "popularity" else dict(SMALL)
    if name == "dmesr":
        options.update(semantics=str(movielens_artefact), id_embedding=True)
    model = _trained(name, split, **options)
    for stage in ("valid", "test"):
        dense = DenseFullRankingEvaluator(split, batch_size=128).evaluate(model, stage)
        for chunk in (997, 16384):  # uneven chunks, and the whole catalogue (9,724 items) in one
            streamed = FullRankingEvaluator(split, batch_size=128, chunk_size=chunk).evaluate(model, stage)
            assert np.array_equal(streamed.users, dense.users)
            assert np.array_equal(streamed.ranks, dense.ranks), (name, stage, chunk)
            assert streamed.summary() == dense.summary()


def test_top_items_are_the_best_valid_items(movielens_split):
    split = movielens_split
    model = _trained("sasrec", split, **SMALL)
    k = 20
    result = FullRankingEvaluator(split, chunk_size=1000).evaluate(model, "test")
    assert result.top_items is not None and result.top_items.shape == (len(result.users), k)
    # no ties in a trained SASRec's float scores: the target is in the top-k exactly when its rank is below k
    in_top = np.array([split.inputs_and_target(int(u), "test")[1] in row for u, row in
                       zip(result.users, result.top_items, strict=True)])
    assert np.array_equal(in_top, result.ranks < k)
    # and the top-k are the k best items outside the history, best first, checked densely for a few users
    for row, user in enumerate(result.users[:25]):
        history, target = split.inputs_and_target(int(user), "test")
        with torch.no_grad():
            scores = model.score(pad_left([history], model.max_len), None)[0].clone()
        scores[0] = float("-inf")
        blocked = np.setdiff1d(history, [target])
        scores[torch.from_numpy(blocked)] = float("-inf")
        chosen = torch.from_numpy(result.top_items[row].copy())
        assert not np.isin(result.top_items[row], blocked).any()
        # one user alone is a different matrix shape than a batch of 256: equal up to float rounding
        assert torch.allclose(scores.topk(k).values, scores[chosen], atol=1e-5)


def test_chunked_ranking_handles_repeats_ties_and_nan():
    """Hand-made scores: a repeated target stays rankable, ties count against it, NaN ranks last."""
    items = torch.tensor([[0.0], [5.0], [3.0], [4.0], [4.0], [1.0]])  # ids 0..5, score = user * value
    users = torch.tensor([[1.0], [1.0], [float("nan")]])
    factors = ScoreFactors((users,), (items,))
    histories = [np.array([1, 3]), np.array([3, 2]), np.array([1])]
    targets = np.array([3, 4, 2])  # user 0: target 3 is also in the history; user 1: item 3 ties item 4
    for chunk in (1, 2, 5):
        result = chunked_full_ranking(factors, 5, targets, histories, chunk, 3)
        # user 0: item 1 is history (excluded); item 4 ties target 3 (counts against) -> rank 1
        # user 1: item 1 (5.0) is higher, item 3 is history; -> rank 1; user 2: NaN -> last of 4 valid = 3
        assert result.ranks.tolist() == [1, 1, 3], chunk
        assert result.top_items[0].tolist()[:2] in ([3, 4], [4, 3])  # ties in either order
        assert result.top_items[1].tolist()[0] == 1


def test_user_sample_is_seeded_sorted_and_shared(movielens_split):
    users = movielens_split.eval_users
    first = full_ranking_sample(users, 100, seed=7)
    assert len(first) == 100 and np.all(np.diff(first) > 0) and np.isin(first, users).all()
    assert np.array_equal(first, full_ranking_sample(users, 100, seed=7))
    assert not np.array_equal(first, full_ranking_sample(users, 100, seed=8))
    assert np.array_equal(full_ranking_sample(users, None, seed=7), users)
    assert np.array_equal(full_ranking_sample(users, len(users) + 5, seed=7), users)
    evaluator = FullRankingEvaluator(movielens_split, max_users=100, seed=7)
    assert np.array_equal(evaluator.users, first)
    model = _trained("popularity", movielens_split)
    result = evaluator.evaluate(model, "test")
    assert np.array_equal(result.users, first) and len(result.ranks) == 100


def test_above_the_threshold_a_sample_is_ranked_with_a_warning(movielens_split):
    messages: list[str] = []
    evaluator = FullRankingEvaluator(movielens_split, seed=3, user_threshold=200, warn=messages.append)
    assert len(evaluator.users) == 200 and len(messages) == 1
    assert "610" in messages[0] and "200" in messages[0] and "full_ranking_users" in messages[0]
    record = evaluator.record()
    assert record["sampled"] and record["users"] == 200 and record["of"] == 610 and record["seed"] == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # below the threshold: everyone, silently
        assert len(FullRankingEvaluator(movielens_split).users) == 610


def test_a_run_records_its_full_ranking_sample(movielens_split, tmp_path):
    config = load_config(None, ["model.name='popularity'", "evaluation.full_ranking_users=150", "name='fr'"])
    outcome = Trainer(config, split=movielens_split, run_dir=tmp_path / "run", quiet=True).fit()
    final = json.loads((outcome.run_dir / "final.json").read_text())
    assert final["full_ranking"]["users"] == 150 and final["full_ranking"]["sampled"]
    sample = json.loads((outcome.run_dir / "full_ranking_users.json").read_text())
    assert sample["user_ids"] == full_ranking_sample(movielens_split.eval_users, 150, 42).tolist()
    assert sample["users_sha256"] == final["full_ranking"]["users_sha256"]


def test_config_rejects_bad_full_ranking_options_and_keeps_old_hashes():
    with pytest.raises(ConfigError, match="full_ranking_users"):
        load_config(None, ["model.name='sasrec'", "evaluation.full_ranking_users=0"])
    with pytest.raises(ConfigError, match="full_ranking_chunk"):
        load_config(None, ["model.name='sasrec'", "evaluation.full_ranking_chunk=0"])
    config = load_config(None, ["model.name='sasrec'"])
    resolved = config.to_dict()
    for section, key in (("evaluation", "full_ranking_users"), ("evaluation", "full_ranking_chunk"),
                         ("training", "num_negatives"), ("training", "negative_sampler"), ("training", "precision"),
                         ("training", "logq_correction")):
        del resolved[section][key]  # a configuration recorded before these options existed
    assert config._hash(resolved) == config.config_hash()
    assert load_config(None, ["model.name='sasrec'", "evaluation.full_ranking_users=10"]).config_hash() != (
        config.config_hash())
