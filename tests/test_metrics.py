from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from prismrec.evaluation import FullRankingEvaluator, SampledRankingEvaluator, metrics_from_ranks, rank_of_positive


def test_hand_computed_ranks_and_metrics():
    scores = torch.tensor([
        [0.9, 0.1, 0.2, 0.3],   # positive first: rank 0
        [0.5, 0.9, 0.1, 0.2],   # one better: rank 1
        [0.1, 0.9, 0.8, 0.7],   # three better: rank 3
    ])
    ranks = rank_of_positive(scores)
    assert ranks.tolist() == [0, 1, 3]
    m = metrics_from_ranks(ranks, [1, 2, 5])
    assert m["hit@1"].tolist() == [1, 0, 0]
    assert m["hit@2"].tolist() == [1, 1, 0]
    assert m["hit@5"].tolist() == [1, 1, 1]
    assert m["ndcg@2"].tolist() == pytest.approx([1.0, 1 / math.log2(3), 0.0])
    assert m["ndcg@5"].tolist() == pytest.approx([1.0, 1 / math.log2(3), 1 / math.log2(5)])
    assert m["mrr@5"].tolist() == pytest.approx([1.0, 0.5, 0.25])


def test_ties_count_against_the_positive():
    scores = torch.tensor([[0.5, 0.5, 0.5, 0.1], [0.7, 0.7, 0.2, 0.1]])
    assert rank_of_positive(scores).tolist() == [2, 1]


def test_nan_positive_is_ranked_last():
    scores = torch.tensor([[float("nan"), 0.1, 0.2]])
    assert rank_of_positive(scores).tolist() == [2]


def test_positive_at_other_column_with_validity_mask():
    scores = torch.tensor([[0.0, 5.0, 3.0, 4.0]])
    valid = torch.tensor([[False, False, True, True]])  # column 1 (higher) is history: excluded
    assert rank_of_positive(scores, torch.tensor([3]), valid).tolist() == [0]


class ConstantScorer:
    """Scores every item the same: the evaluators must not reward it."""

    max_len = 5

    def __init__(self, n_items: int) -> None:
        self.n_items = n_items

    def score(self, inputs, candidates):
        if candidates is None:
            return torch.zeros(inputs.shape[0], self.n_items + 1)
        return torch.zeros(candidates.shape, dtype=torch.float32)


def test_constant_model_gets_no_credit(movielens_split):
    scorer = ConstantScorer(movielens_split.dataset.n_items)
    sampled = SampledRankingEvaluator(movielens_split, seed=3).evaluate(scorer, "test").summary()
    assert sampled["hit@10"] <= 10 / 101
    assert sampled["hit@20"] == 0.0
    full = FullRankingEvaluator(movielens_split).evaluate(scorer, "valid").summary()
    assert full["hit@10"] == 0.0


class OracleScorer(ConstantScorer):
    """Knows the target: checks the evaluators put the positive where they say they do."""

    def __init__(self, n_items: int, targets: dict[int, int]) -> None:
        super().__init__(n_items)
        self.targets = targets

    def score(self, inputs, candidates):
        last = inputs[:, -1].tolist()
        wanted = torch.tensor([self.targets[x] for x in last])
        if candidates is None:
            out = torch.zeros(inputs.shape[0], self.n_items + 1)
            out[torch.arange(len(wanted)), wanted] = 1.0
            return out
        return (candidates == wanted[:, None]).float()


def test_oracle_gets_full_credit(movielens_split):
    split = movielens_split
    targets = {}
    users = []
    for u in split.eval_users:
        hist, target = split.inputs_and_target(int(u), "valid")
        if int(hist[-1]) not in targets:  # the oracle keys on the last item; keep users where that is unique
            targets[int(hist[-1])] = target
            users.append(int(u))
    scorer = OracleScorer(split.dataset.n_items, targets)
    users_arr = np.array(users)
    for evaluator in (SampledRankingEvaluator(split, seed=3), FullRankingEvaluator(split)):
        result = evaluator.evaluate(scorer, "valid", users_arr).summary()
        assert result["hit@5"] == 1.0 and result["ndcg@10"] == 1.0 and result["mrr"] == 1.0
