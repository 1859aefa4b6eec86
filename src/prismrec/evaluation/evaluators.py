"""The paper's sampled protocol (100 negatives, paper 4.1.3) and full ranking, batched on tensors."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from prismrec.data.errors import DataError
from prismrec.data.paths import output_dir
from prismrec.data.split import LeaveOneOutSplit, Stage
from prismrec.evaluation.metrics import metrics_from_ranks, rank_of_positive


class Scorer(Protocol):
    """What an evaluator needs from a model."""

    max_len: int

    def score(self, inputs: torch.Tensor, candidates: torch.Tensor | None) -> torch.Tensor:
        """``inputs``: (B, L) left-padded item ids. Returns (B, C) scores for ``candidates`` (B, C), or
        (B, n_items + 1) scores for every item id (column 0 = padding) when ``candidates`` is None."""
        ...


def pad_left(sequences: Sequence[np.ndarray], max_len: int) -> torch.Tensor:
    """Keep the last ``max_len`` items of each sequence, left-padded with 0."""
    out = np.zeros((len(sequences), max_len), dtype=np.int64)
    for row, seq in enumerate(sequences):
        tail = seq[-max_len:]
        if len(tail):
            out[row, max_len - len(tail):] = tail
    return torch.from_numpy(out)


@dataclass
class EvaluationResult:
    """Per-user metrics (aligned with ``users``) for one stage and mode."""

    mode: str
    stage: str
    users: np.ndarray
    ranks: np.ndarray
    per_user: dict[str, np.ndarray] = field(default_factory=dict)

    def summary(self) -> dict[str, float]:
        return {name: float(values.mean()) if len(values) else float("nan") for name, values in self.per_user.items()}

    def subset(self, users: np.ndarray) -> EvaluationResult:
        mask = np.isin(self.users, users)
        return EvaluationResult(self.mode, self.stage, self.users[mask], self.ranks[mask],
                                {k: v[mask] for k, v in self.per_user.items()})


def sample_negatives(sequences: Sequence[np.ndarray], n_items: int, num: int, seed: int) -> np.ndarray:
    """For each user, ``num`` distinct items drawn uniformly from those the user never interacted with."""
    rng = np.random.default_rng(seed)
    out = np.zeros((len(sequences), num), dtype=np.int64)
    for user, seq in enumerate(sequences):
        seen = np.unique(seq)
        if n_items - len(seen) < num:
            raise DataError(f"user #{user} has interacted with {len(seen)} of {n_items} items: fewer than "
                            f"{num} are left to sample negatives from; lower evaluation.num_negatives")
        chosen: list[int] = []
        taken: set[int] = set()
        while len(chosen) < num:
            draw = rng.integers(1, n_items + 1, size=2 * num)
            for item in draw[~np.isin(draw, seen)]:
                if int(item) not in taken:
                    taken.add(int(item))
                    chosen.append(int(item))
                    if len(chosen) == num:
                        break
        out[user] = chosen
    return out


class _Evaluator:
    mode = "base"

    def __init__(self, split: LeaveOneOutSplit, ks: Sequence[int] = (5, 10, 20), batch_size: int = 256,
                 device: str | torch.device = "cpu") -> None:
        self.split = split
        self.ks = sorted(set(ks))
        self.batch_size = batch_size
        self.device = torch.device(device)

    def _candidates(self, users: np.ndarray, targets: np.ndarray) -> torch.Tensor | None:
        raise NotImplementedError

    def _ranks(self, scores: torch.Tensor, users: np.ndarray, targets: np.ndarray,
               histories: list[np.ndarray]) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, model: Scorer, stage: Stage, users: np.ndarray | None = None) -> EvaluationResult:
        users = self.split.eval_users if users is None else np.asarray(users)
        was_training = getattr(model, "training", False)
        if hasattr(model, "eval"):
            model.eval()
        all_ranks: list[torch.Tensor] = []
        try:
            for start in range(0, len(users), self.batch_size):
                batch_users = users[start:start + self.batch_size]
                pairs = [self.split.inputs_and_target(int(u), stage) for u in batch_users]
                histories = [p[0] for p in pairs]
                targets = np.array([p[1] for p in pairs], dtype=np.int64)
                inputs = pad_left(histories, model.max_len).to(self.device)
                candidates = self._candidates(batch_users, targets)
                scores = model.score(inputs, None if candidates is None else candidates.to(self.device))
                all_ranks.append(self._ranks(scores.float().cpu(), batch_users, targets, histories))
        finally:
            if was_training and hasattr(model, "train"):
                model.train()
        ranks = torch.cat(all_ranks) if all_ranks else torch.zeros(0, dtype=torch.long)
        per_user = {k: v.numpy() for k, v in metrics_from_ranks(ranks, self.ks).items()}
        return EvaluationResult(self.mode, stage, users, ranks.numpy(), per_user)


class SampledRankingEvaluator(_Evaluator):
    """Positive + ``num_negatives`` items the user never interacted with (drawn once per dataset and seed,
    cached under ``$PRISMREC_HOME/cache/negatives`` so every model is scored on the same candidates)."""

    mode = "sampled"

    def __init__(self, split: LeaveOneOutSplit, num_negatives: int = 100, seed: int = 42,
                 ks: Sequence[int] = (5, 10, 20), batch_size: int = 256, device: str | torch.device = "cpu",
                 cache_dir: Path | None = None) -> None:
        super().__init__(split, ks, batch_size, device)
        self.num_negatives = num_negatives
        self.seed = seed
        self.negatives = self._load_or_sample(cache_dir)

    def cache_path(self, cache_dir: Path | None = None) -> Path:
        folder = cache_dir or output_dir("cache") / "negatives"
        ds = self.split.dataset
        return Path(folder) / f"{ds.name}-{ds.fingerprint}-n{self.num_negatives}-seed{self.seed}.safetensors"

    def _load_or_sample(self, cache_dir: Path | None) -> np.ndarray:
        path = self.cache_path(cache_dir)
        ds = self.split.dataset
        if path.exists():
            negatives = load_file(str(path))["negatives"]
            if negatives.shape == (ds.n_users, self.num_negatives):
                return negatives
        negatives = sample_negatives(ds.sequences, ds.n_items, self.num_negatives, self.seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"negatives": negatives}, str(tmp), metadata={"dataset": ds.name, "fingerprint": ds.fingerprint,
                                                                 "seed": str(self.seed)})
        tmp.replace(path)  # atomic: a killed run never leaves half a file
        return negatives

    def _candidates(self, users: np.ndarray, targets: np.ndarray) -> torch.Tensor:
        cands = np.concatenate([targets[:, None], self.negatives[users]], axis=1)
        return torch.from_numpy(cands)

    def _ranks(self, scores: torch.Tensor, users: np.ndarray, targets: np.ndarray,
               histories: list[np.ndarray]) -> torch.Tensor:
        return rank_of_positive(scores)


class FullRankingEvaluator(_Evaluator):
    """The positive against every item except padding and the items already in the user's history."""

    mode = "full"

    def _candidates(self, users: np.ndarray, targets: np.ndarray) -> None:
        return None

    def _ranks(self, scores: torch.Tensor, users: np.ndarray, targets: np.ndarray,
               histories: list[np.ndarray]) -> torch.Tensor:
        valid = torch.ones_like(scores, dtype=torch.bool)
        valid[:, 0] = False
        rows = np.concatenate([np.full(len(h), i) for i, h in enumerate(histories)]) if histories else np.zeros(0)
        cols = np.concatenate(histories) if histories else np.zeros(0)
        valid[torch.from_numpy(rows.astype(np.int64)), torch.from_numpy(cols.astype(np.int64))] = False
        target_idx = torch.from_numpy(targets)
        # A repeated item (target also in the history) stays rankable.
        valid[torch.arange(len(targets)), target_idx] = True
        return rank_of_positive(scores, target_idx, valid)
