"""MPO (Modality-aware Progressive Optimisation): Speeder's staged training loop and its training examples.

:func:`train_speeder` runs the stages in order, each from the previous one's weights with a fresh AdamW over
exactly that stage's parameters, and validates after each (:func:`validate`, :class:`StageRecord`);
:func:`sample_training_batch` draws the examples (a random cut point per user, uniform unseen choice negatives).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from prismrec.data.split import LeaveOneOutSplit
from prismrec.evaluation.evaluators import SampledRankingEvaluator
from prismrec.llmrec.speeder.choice import evaluate_choice
from prismrec.llmrec.speeder.config import SpeederError, SpeederTrainingOptions
from prismrec.llmrec.speeder.model import Speeder
from prismrec.llmrec.speeder.prompts import PromptBatch


def uniform_unseen(seen: np.ndarray, n_items: int, num: int, rng: np.random.Generator) -> np.ndarray:
    """``num`` distinct items in 1..n_items not in ``seen``."""
    seen_set = set(int(i) for i in seen)
    if n_items - len(seen_set) < num:
        raise SpeederError(f"only {n_items - len(seen_set)} unseen items left; need {num}")
    chosen: list[int] = []
    while len(chosen) < num:
        for item in rng.integers(1, n_items + 1, size=2 * num):
            item = int(item)
            if item not in seen_set:
                seen_set.add(item)
                chosen.append(item)
                if len(chosen) == num:
                    break
    return np.array(chosen, dtype=np.int64)


@dataclass
class TrainingBatch:
    prompts: PromptBatch
    targets: torch.Tensor
    negatives: torch.Tensor


def sample_training_batch(model: Speeder, train_sequences: Sequence[np.ndarray], users: np.ndarray,
                          n_items: int, rng: np.random.Generator, with_choices: bool = True) -> TrainingBatch:
    """A random cut point per user: the ``max_len`` items before it are the history, the item at it the target."""
    n_choices = model.options.n_choices
    histories, targets, choices, answers = [], [], [], []
    for user in users:
        seq = train_sequences[int(user)]
        cut = int(rng.integers(1, len(seq)))
        histories.append(seq[:cut])
        targets.append(int(seq[cut]))
        if with_choices:
            listed = np.concatenate([[seq[cut]], uniform_unseen(seq, n_items, n_choices - 1, rng)])
            order = rng.permutation(n_choices)
            choices.append(listed[order])
            answers.append(int(np.flatnonzero(order == 0)[0]))
    prompts = model.prompts.build(histories, choices if with_choices else None, answers if with_choices else None)
    negatives = rng.integers(1, n_items + 1, size=model.options.train_negatives)
    return TrainingBatch(prompts, torch.tensor(targets), torch.from_numpy(negatives))


@dataclass
class StageRecord:
    name: str
    modalities: list[str]
    lora: bool
    steps: int
    seconds: float
    samples_per_s: float
    trainable_parameters: int
    first_loss: float
    last_loss: float
    first_retrieval_loss: float  # the retrieval term alone: comparable between batches with and without choices
    last_retrieval_loss: float
    valid: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def train_users(split: LeaveOneOutSplit) -> np.ndarray:
    lengths = np.array([len(s) for s in split.train_sequences])
    return np.flatnonzero(lengths >= 2)


def validate(model: Speeder, split: LeaveOneOutSplit, users: np.ndarray, evaluator: SampledRankingEvaluator,
             seed: int, batch_size: int = 16) -> dict[str, float]:
    """Sampled H@10/N@10 and choice Hit@1 on validation ``users``."""
    summary = evaluator.evaluate(model, "valid", users=users).summary()
    out = {k: summary[k] for k in ("hit@10", "ndcg@10") if k in summary}
    out.update({f"choice_{k}": v for k, v in evaluate_choice(model, split, "valid", users, seed, batch_size).items()})
    return out


def train_speeder(model: Speeder, split: LeaveOneOutSplit, options: SpeederTrainingOptions, seed: int,
                  evaluator: SampledRankingEvaluator | None = None, users: np.ndarray | None = None,
                  valid_users: np.ndarray | None = None, progress: Any = None,
                  log: Any = None) -> list[StageRecord]:
    """MPO: run the stages in order, each from the previous one's weights; validation after each stage.

    ``users`` restricts training to those users; ``log(record_dict)`` is called after each stage.
    """
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    pool = train_users(split) if users is None else np.asarray(users)
    if valid_users is None:
        valid_users = split.eval_users[:options.valid_users]
    if evaluator is None:
        evaluator = SampledRankingEvaluator(split, seed=42, ks=(10,), batch_size=16)
    train = split.train_sequences
    choice_weight, choice_fraction = model.options.choice_loss_weight, model.options.choice_fraction
    records: list[StageRecord] = []
    for stage in options.stages:
        params = model.set_stage(stage)
        optimizer = torch.optim.AdamW(params, lr=stage.lr, weight_decay=options.weight_decay)
        model.train()
        losses: list[float] = []
        retrieval_losses: list[float] = []
        task = progress.add_task(f"speeder stage {stage.name}", total=stage.steps) if progress is not None else None
        start = time.perf_counter()
        for _ in range(stage.steps):
            batch_users = rng.choice(pool, size=min(options.batch_size, len(pool)), replace=False)
            with_choices = choice_weight > 0 and bool(rng.random() < choice_fraction)
            batch = sample_training_batch(model, train, batch_users, split.dataset.n_items, rng, with_choices)
            parts = model.loss(batch.prompts, batch.targets, batch.negatives)
            loss = parts["loss"]
            retrieval_losses.append(float(parts["retrieval"].detach()))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if options.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, options.grad_clip)
            optimizer.step()
            losses.append(float(loss.detach()))
            if progress is not None and task is not None:
                progress.update(task, advance=1, description=f"speeder stage {stage.name} loss {losses[-1]:.3f}")
        seconds = time.perf_counter() - start
        valid = validate(model, split, valid_users, evaluator, evaluator.seed) if len(valid_users) else {}
        def mean_of(values: list[float], tail: bool) -> float:
            part = max(1, len(values) // 5)  # first / last fifth of the stage's steps
            return float(np.mean(values[-part:] if tail else values[:part])) if values else float("nan")

        record = StageRecord(stage.name, list(stage.modalities), stage.lora, stage.steps, seconds,
                             stage.steps * options.batch_size / seconds if seconds > 0 and stage.steps else 0.0,
                             sum(p.numel() for p in params), mean_of(losses, False), mean_of(losses, True),
                             mean_of(retrieval_losses, False), mean_of(retrieval_losses, True), valid)
        records.append(record)
        if log is not None:
            log(record.as_dict())
    model.eval()
    return records
