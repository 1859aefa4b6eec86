"""Evaluation: the paper's sampled protocol and full ranking (bounded and streamed over the catalogue)."""

from prismrec.evaluation.evaluators import (
    FULL_RANKING_USER_THRESHOLD,
    ChunkedRanking,
    DenseFullRankingEvaluator,
    EvaluationResult,
    FullRankingEvaluator,
    SampledRankingEvaluator,
    ScoreFactors,
    chunked_full_ranking,
    full_ranking_sample,
    pad_left,
    sample_negatives,
)
from prismrec.evaluation.metrics import metrics_from_ranks, rank_of_positive

__all__ = [
    "FULL_RANKING_USER_THRESHOLD",
    "ChunkedRanking",
    "DenseFullRankingEvaluator",
    "EvaluationResult",
    "FullRankingEvaluator",
    "SampledRankingEvaluator",
    "ScoreFactors",
    "chunked_full_ranking",
    "full_ranking_sample",
    "metrics_from_ranks",
    "pad_left",
    "rank_of_positive",
    "sample_negatives",
]
