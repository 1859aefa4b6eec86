"""The paper's sampled protocol (100 negatives, paper 4.1.3) and full ranking, batched on tensors."""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

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
    top_items: np.ndarray | None = None  # full ranking: each user's top-k valid items, best first

    def summary(self) -> dict[str, float]:
        return {name: float(values.mean()) if len(values) else float("nan") for name, values in self.per_user.items()}

    def subset(self, users: np.ndarray) -> EvaluationResult:
        mask = np.isin(self.users, users)
        return EvaluationResult(self.mode, self.stage, self.users[mask], self.ranks[mask],
                                {k: v[mask] for k, v in self.per_user.items()},
                                None if self.top_items is None else self.top_items[mask])


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
    def _batches(self, model: Scorer, stage: Stage, users: np.ndarray
                 ) -> Iterator[tuple[np.ndarray, list[np.ndarray], np.ndarray, torch.Tensor]]:
        """Per batch of users: the users, their histories, their targets and the left-padded inputs."""
        for start in range(0, len(users), self.batch_size):
            batch_users = users[start:start + self.batch_size]
            pairs = [self.split.inputs_and_target(int(u), stage) for u in batch_users]
            histories = [p[0] for p in pairs]
            targets = np.array([p[1] for p in pairs], dtype=np.int64)
            yield batch_users, histories, targets, pad_left(histories, model.max_len).to(self.device)

    def evaluate(self, model: Scorer, stage: Stage, users: np.ndarray | None = None) -> EvaluationResult:
        users = self.split.eval_users if users is None else np.asarray(users)
        was_training = getattr(model, "training", False)
        if hasattr(model, "eval"):
            model.eval()
        all_ranks: list[torch.Tensor] = []
        try:
            for batch_users, histories, targets, inputs in self._batches(model, stage, users):
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


# Above this many evaluation users, full ranking (every user against the whole catalogue) scores a seeded
# sample of this many unless ``evaluation.full_ranking_users`` says otherwise, and warns that it does.
FULL_RANKING_USER_THRESHOLD = 50_000


def full_ranking_sample(users: np.ndarray, max_users: int | None, seed: int) -> np.ndarray:
    """The users full ranking scores: all of ``users`` when ``max_users`` is None or not smaller, else a
    seeded sample of ``max_users`` of them (sorted; the same for every model, since it depends only on the
    users and the seed)."""
    users = np.asarray(users)
    if max_users is None or max_users >= len(users):
        return users
    rng = np.random.default_rng([seed, 0x46554C4C])  # its own stream: never the sampled protocol's negatives
    return np.sort(rng.choice(users, size=max_users, replace=False))


@dataclass
class ScoreFactors:
    """A model's full-catalogue scores as a sum of dot products: ``sum_k users[k] @ items[k].T``.

    ``users[k]``: (B, d_k) per batch; ``items[k]``: (n_items + 1, d_k), row 0 = padding. A model offering
    them (``score_factors``) is scored over the catalogue chunk by chunk without ever forming (B, n_items).
    """

    users: tuple[torch.Tensor, ...]
    items: tuple[torch.Tensor, ...]

    def block(self, columns: torch.Tensor | slice) -> torch.Tensor:
        """Scores of every user against ``items[k][columns]``; summed in the order the models' dense
        ``score`` sums them, so the numbers are the dense ones."""
        out = self.users[0] @ self.items[0][columns].T
        for user, table in zip(self.users[1:], self.items[1:], strict=True):
            out = out + user @ table[columns].T
        return out


class _CandidateBlocks:
    """The generic route for models without :class:`ScoreFactors`: ``score(inputs, candidates)`` on each
    chunk of item ids (bounded memory as well, one model call per chunk)."""

    def __init__(self, model: Scorer, inputs: torch.Tensor) -> None:
        self.model = model
        self.inputs = inputs

    def block(self, columns: torch.Tensor | slice) -> torch.Tensor:
        ids = columns if isinstance(columns, torch.Tensor) else torch.arange(
            columns.start, columns.stop, device=self.inputs.device)
        return self.model.score(self.inputs, ids.view(1, -1).expand(self.inputs.shape[0], -1))


@dataclass
class ChunkedRanking:
    """What :func:`chunked_full_ranking` returns for one batch of users."""

    ranks: torch.Tensor  # (B,) 0-based pessimistic rank of the positive among the valid items
    top_items: torch.Tensor  # (B, k) the k best valid item ids, best first
    top_scores: torch.Tensor  # (B, k)


def chunked_full_ranking(blocks: ScoreFactors | _CandidateBlocks, n_items: int, targets: np.ndarray,
                         histories: Sequence[np.ndarray], chunk_size: int, k: int,
                         device: str | torch.device = "cpu") -> ChunkedRanking:
    """Rank each user's positive against every item not in their history, ``chunk_size`` items at a time.

    Per chunk: one block of scores (B, chunk), the history items falling into the chunk excluded (the
    positive stays rankable when it repeats a history item), the count of valid items scoring at least the
    positive added to the rank (ties count against the positive, as :func:`rank_of_positive` does), and
    the chunk's top-k merged into the running top-k with ``torch.topk``. Memory is O(B x chunk_size), not
    O(B x n_items), and the ranks equal those of the dense computation. The bookkeeping (which columns to
    exclude) is done on the host from ``targets`` and ``histories``; the scores stay on ``device``.
    """
    device = torch.device(device)
    targets = np.asarray(targets, dtype=np.int64)
    batch = len(targets)
    # The positive's score through the same matrix-product route as the blocks (one column per distinct target).
    unique, inverse = np.unique(targets, return_inverse=True)
    pos = blocks.block(torch.from_numpy(unique).to(device)).float().gather(
        1, torch.from_numpy(inverse.reshape(-1, 1)).to(device)).squeeze(1)
    # Excluded (row, column) pairs: the history, and the positive's own column (counted apart).
    rows_np = np.concatenate([np.full(len(h), i, dtype=np.int64) for i, h in enumerate(histories)] +
                             [np.arange(batch, dtype=np.int64)])
    cols_np = np.concatenate([np.asarray(h, dtype=np.int64) for h in histories] + [targets])
    pairs = np.unique(np.stack([rows_np, cols_np], axis=1), axis=0)  # a repeated item is excluded once
    # Valid items per user: every item, minus the distinct history items other than the positive.
    excluded_per_user = np.bincount(pairs[:, 0], minlength=batch) - 1
    worst = torch.from_numpy(np.maximum(n_items - excluded_per_user, 1) - 1).to(device)
    order = np.argsort(pairs[:, 1], kind="stable")
    sorted_cols = pairs[order, 1]
    rows = torch.from_numpy(pairs[order, 0]).to(device)
    cols = torch.from_numpy(sorted_cols).to(device)
    count = torch.zeros(batch, dtype=torch.long, device=device)
    keep = min(k, n_items)
    # The positive competes for the top-k as well (its own column is excluded from the chunks below).
    top_scores = pos.nan_to_num(nan=float("-inf")).view(-1, 1)
    top_items = torch.from_numpy(targets).to(device).view(-1, 1)
    for start in range(1, n_items + 1, chunk_size):  # column 0 (padding) is never scored
        stop = min(start + chunk_size, n_items + 1)
        scores = blocks.block(slice(start, stop)).float()
        lo, hi = (int(i) for i in np.searchsorted(sorted_cols, [start, stop]))
        if hi > lo:
            scores[rows[lo:hi], cols[lo:hi] - start] = float("nan")  # NaN compares False: never counted
        count += (scores >= pos.view(-1, 1)).sum(dim=1)
        values, index = scores.nan_to_num(nan=float("-inf")).topk(min(keep, stop - start), dim=1)
        merged = torch.cat([top_scores, values], dim=1)
        merged_items = torch.cat([top_items, index + start], dim=1)
        top_scores, pick = merged.topk(min(keep, merged.shape[1]), dim=1)
        top_items = merged_items.gather(1, pick)
    # With the positive's own column left out, ``count`` is the number of other valid items scoring at least
    # as high: the pessimistic 0-based rank. A NaN positive must not look perfect, so it ranks last.
    ranks = torch.where(torch.isnan(pos), worst, count)
    return ChunkedRanking(ranks, top_items, top_scores)


class FullRankingEvaluator(_Evaluator):
    """The positive against every item except padding and the items already in the user's history.

    Bounded and streaming: the catalogue is scored ``chunk_size`` items at a time (see
    :func:`chunked_full_ranking`), and at most ``max_users`` users are ranked, a seeded sample of the
    evaluation users (:func:`full_ranking_sample`, the same for every model). ``max_users=None`` means every
    user up to ``user_threshold`` (:data:`FULL_RANKING_USER_THRESHOLD`) and, above it, a sample of that many
    with a warning (``warn``, default :func:`warnings.warn`).
    """

    mode = "full"

    def __init__(self, split: LeaveOneOutSplit, ks: Sequence[int] = (5, 10, 20), batch_size: int = 256,
                 device: str | torch.device = "cpu", max_users: int | None = None, seed: int = 42,
                 chunk_size: int = 16384, warn: Callable[[str], None] | None = None,
                 user_threshold: int = FULL_RANKING_USER_THRESHOLD) -> None:
        super().__init__(split, ks, batch_size, device)
        if chunk_size < 1:
            raise ValueError(f"full ranking chunk_size must be positive, got {chunk_size}")
        self.chunk_size = chunk_size
        self.seed = seed
        available = len(split.eval_users)
        self.requested_users = max_users
        limit = max_users
        if limit is None and available > user_threshold:
            limit = user_threshold
            (warn or warnings.warn)(
                f"full ranking: {available:,} evaluation users, more than {user_threshold:,}; "
                f"ranking a seeded sample of {limit:,} (seed {seed}). Set evaluation.full_ranking_users to "
                f"choose the number (e.g. {available} for all)")
        self.users = full_ranking_sample(split.eval_users, limit, seed)

    def record(self) -> dict[str, Any]:
        """What a run records about the users full ranking scored."""
        users = self.users.astype(np.int64)
        return {"users": len(users), "of": len(self.split.eval_users), "sampled": len(users) < len(
            self.split.eval_users), "seed": self.seed, "requested": self.requested_users,
            "users_sha256": hashlib.sha256(users.tobytes()).hexdigest()}

    @torch.no_grad()
    def evaluate(self, model: Scorer, stage: Stage, users: np.ndarray | None = None) -> EvaluationResult:
        users = self.users if users is None else np.asarray(users)
        was_training = getattr(model, "training", False)
        if hasattr(model, "eval"):
            model.eval()
        n_items = self.split.dataset.n_items
        k = max(self.ks)
        all_ranks: list[torch.Tensor] = []
        all_top: list[torch.Tensor] = []
        try:
            for _users, histories, targets, inputs in self._batches(model, stage, users):
                factors = model.score_factors(inputs) if hasattr(model, "score_factors") else None
                blocks = factors if factors is not None else _CandidateBlocks(model, inputs)
                result = chunked_full_ranking(blocks, n_items, targets, histories, self.chunk_size, k, self.device)
                all_ranks.append(result.ranks.cpu())
                all_top.append(result.top_items.cpu())
        finally:
            if was_training and hasattr(model, "train"):
                model.train()
        ranks = torch.cat(all_ranks) if all_ranks else torch.zeros(0, dtype=torch.long)
        per_user = {name: v.numpy() for name, v in metrics_from_ranks(ranks, self.ks).items()}
        top = torch.cat(all_top).numpy() if all_top else np.zeros((0, k), dtype=np.int64)
        return EvaluationResult(self.mode, stage, users, ranks.numpy(), per_user, top_items=top)


class DenseFullRankingEvaluator(_Evaluator):
    """The reference full ranking: one (B, n_items + 1) score matrix and validity mask per batch of users.

    O(batch x catalogue) memory; kept as the reference :class:`FullRankingEvaluator` is tested against.
    """

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
