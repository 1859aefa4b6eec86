"""Most-popular ranker: every user gets items ordered by their training-interaction count.

A sanity floor for the evaluators: any sequential model worth training must beat it.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
import torch

from prismrec.data.split import LeaveOneOutSplit
from prismrec.evaluation.evaluators import ScoreFactors
from prismrec.models.base import Recommender
from prismrec.models.registry import MODELS
from prismrec.options import ModelConfig


class PopularityConfig(ModelConfig):
    name: Literal["popularity"] = "popularity"
    max_len: int = 1


@MODELS.register("popularity")
class Popularity(Recommender):
    Config = PopularityConfig
    trainable: ClassVar[bool] = False

    def __init__(self, counts: np.ndarray, max_len: int = 1) -> None:
        super().__init__()
        self.register_buffer("counts", torch.as_tensor(counts, dtype=torch.float32))
        self.max_len = max_len

    @classmethod
    def build(cls, config: PopularityConfig, split: LeaveOneOutSplit) -> Popularity:
        counts = np.bincount(np.concatenate(split.train_sequences), minlength=split.dataset.n_items + 1)
        counts[0] = 0
        return cls(counts.astype(np.float32), config.max_len)

    @classmethod
    def from_state(cls, config: PopularityConfig, n_items: int, state: dict[str, torch.Tensor]) -> Popularity:
        return cls(state["counts"].numpy(), config.max_len)

    def score(self, inputs: torch.Tensor, candidates: torch.Tensor | None) -> torch.Tensor:
        if candidates is None:
            return self.counts.expand(inputs.shape[0], -1)
        return self.counts[candidates]

    def score_factors(self, inputs: torch.Tensor) -> ScoreFactors:
        ones = torch.ones((inputs.shape[0], 1), dtype=self.counts.dtype, device=inputs.device)
        return ScoreFactors((ones,), (self.counts.view(-1, 1),))
