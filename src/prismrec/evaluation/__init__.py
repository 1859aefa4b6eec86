"""Evaluation: the paper's sampled protocol and full ranking."""

from prismrec.evaluation.evaluators import (
    EvaluationResult,
    FullRankingEvaluator,
    SampledRankingEvaluator,
    pad_left,
    sample_negatives,
)
from prismrec.evaluation.metrics import metrics_from_ranks, rank_of_positive

__all__ = [
    "EvaluationResult",
    "FullRankingEvaluator",
    "SampledRankingEvaluator",
    "metrics_from_ranks",
    "pad_left",
    "rank_of_positive",
    "sample_negatives",
]
