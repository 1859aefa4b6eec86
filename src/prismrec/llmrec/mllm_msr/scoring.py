"""MLLM-MSR training data and evaluation glue: the yes/no training samples of step 3 (last training items as
positives, sampled never-seen items as negatives), :class:`MLLMMSRScorer` (the recommender behind the
evaluators' ``score(inputs, candidates)``, step 4) and :func:`train_and_score` (steps 1-3 on given users and
candidates, with timings; the benchmarks use it)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from rich.console import Console

from prismrec.data.split import LeaveOneOutSplit, Stage
from prismrec.evaluation.evaluators import pad_left
from prismrec.evaluation.metrics import metrics_from_ranks, rank_of_positive
from prismrec.llmrec.mllm_msr.config import MLLMMSROptions, MLLMMSRTrainingOptions
from prismrec.llmrec.mllm_msr.prompts import ItemTexts
from prismrec.llmrec.mllm_msr.recommender import MLLMMSR, PromptSample
from prismrec.llmrec.mllm_msr.summaries import UserSummariser, build_summariser, progress_bar
from prismrec.semantics.cache import SemanticCache


def sample_users(split: LeaveOneOutSplit, count: int | None, seed: int) -> np.ndarray:
    """A seeded sample of evaluable users (sorted), or all of them."""
    users = split.eval_users
    if count is None or count >= len(users):
        return users
    return np.sort(np.random.default_rng(seed).choice(users, size=count, replace=False))


def training_windows(split: LeaveOneOutSplit, summariser: UserSummariser, users: np.ndarray,
                     positives_per_user: int) -> list[tuple[int, int, tuple[int, ...]]]:
    """(user, positive item, window before it) for the last ``positives_per_user`` training items."""
    out = []
    for user in users:
        sequence = split.train_sequence(int(user))
        for position in range(max(1, len(sequence) - positives_per_user), len(sequence)):
            out.append((int(user), int(sequence[position]),
                        summariser.window(sequence[:position], anchor_length=len(sequence))))
    return out


def negatives_for(split: LeaveOneOutSplit, user: int, count: int, rng: np.random.Generator) -> list[int]:
    seen = set(int(i) for i in split.dataset.sequences[user])
    out: list[int] = []
    while len(out) < count:
        item = int(rng.integers(1, split.dataset.n_items + 1))
        if item not in seen and item not in out:
            out.append(item)
    return out


def build_training_samples(model: MLLMMSR, split: LeaveOneOutSplit, summariser: UserSummariser, users: np.ndarray,
                           options: MLLMMSRTrainingOptions, seed: int, console: Console | None = None,
                           quiet: bool = False) -> list[PromptSample]:
    rng = np.random.default_rng(seed)
    positives = training_windows(split, summariser, users, options.positives_per_user)
    # "user@history length" (the window starts max_history items before the end of the training sequence)
    labels = [f"{u}@{max(0, len(split.train_sequence(u)) - summariser.options.max_history) + len(w)}"
              for u, _, w in positives]
    summaries = summariser.summarise(dict(zip(labels, (w for _, _, w in positives), strict=True)), console, quiet)
    samples: list[PromptSample] = []
    for label, (user, item, window) in zip(labels, positives, strict=True):
        samples.append(PromptSample(model.prompt(summaries[label], window, item), True))
        for negative in negatives_for(split, user, options.negatives_per_positive, rng):
            samples.append(PromptSample(model.prompt(summaries[label], window, negative), False))
    return samples


class MLLMMSRScorer:
    """Adapts MLLM-MSR to the evaluators' ``score(inputs, candidates)`` for one stage.

    ``max_len`` is the longest sequence, so ``inputs`` carry each user's whole history (left padding
    stripped here); the window is anchored at the training sequence's length (``len(history)`` minus the
    stage's held-out items), which is what lets validation and test summaries extend training ones.
    """

    def __init__(self, model: MLLMMSR, summariser: UserSummariser, split: LeaveOneOutSplit, stage: Stage,
                 batch_size: int = 16, console: Console | None = None, quiet: bool = False) -> None:
        self.model = model
        self.summariser = summariser
        self.stage = stage
        self.batch_size = batch_size
        self.console = console
        self.quiet = quiet
        self.max_len = max(len(s) for s in split.dataset.sequences)
        # Only to label the cached summaries with the user they belong to (the cache key is the content).
        self._users = {np.asarray(split.inputs_and_target(int(u), stage)[0], dtype=np.int64).tobytes(): int(u)
                       for u in split.eval_users}
        self.candidates_scored = 0
        self.prompt_tokens = 0
        self.score_seconds = 0.0

    def eval(self) -> MLLMMSRScorer:
        return self

    def score(self, inputs: torch.Tensor, candidates: torch.Tensor | None) -> torch.Tensor:
        if candidates is None:
            raise ValueError("MLLM-MSR scores sampled candidates only (full ranking is out of reach)")
        held_out = 0 if self.stage == "valid" else 1
        windows: dict[str, tuple[int, ...]] = {}
        for row in inputs.cpu().numpy():
            history = row[row > 0].astype(np.int64)
            window = self.summariser.window(history, anchor_length=len(history) - held_out)
            user = self._users.get(history.tobytes())
            label = f"{user}@{len(history)}"
            windows[label if user is not None and label not in windows else f"row{len(windows)}"] = window
        labels = list(windows)
        summaries = self.summariser.summarise(windows, self.console, self.quiet)
        prompts = [self.model.prompt(summaries[label], windows[label], int(c))
                   for label, row in zip(labels, candidates.tolist(), strict=True) for c in row]
        self.prompt_tokens += sum(self.model.prompt_tokens(prompts))
        started = time.perf_counter()
        with progress_bar(self.console, self.quiet) as progress:
            task = progress.add_task(f"score {self.stage} candidates", total=len(prompts))
            scores = self.model.score_prompts(prompts, self.batch_size, lambda n: progress.advance(task, n))
        self.score_seconds += time.perf_counter() - started
        self.candidates_scored += len(prompts)
        return scores.view(candidates.shape[0], candidates.shape[1])


@dataclass
class TrainScoreResult:
    """What :func:`train_and_score` measured (scores are (users, candidates), positive in column 0)."""

    users: np.ndarray
    scores: torch.Tensor
    metrics: dict[str, float]
    timings: dict[str, float] = field(default_factory=dict)


def train_and_score(split: LeaveOneOutSplit, train_users: np.ndarray, eval_users: np.ndarray,
                    candidates: np.ndarray, options: MLLMMSROptions, training: MLLMMSRTrainingOptions,
                    cache: SemanticCache, stage: Stage = "test", seed: int = 42, ks: Sequence[int] = (5, 10, 20),
                    console: Console | None = None, quiet: bool = False) -> tuple[MLLMMSR, TrainScoreResult]:
    """Train MLLM-MSR on ``train_users`` and score ``candidates`` (``(len(eval_users), C)``, the held-out
    item first) for ``eval_users`` at ``stage``; timings cover summaries, training and scoring separately.

    The benchmarks use it to put MLLM-MSR and Speeder on the same users and candidates.
    """
    items = ItemTexts(split.dataset, options.items)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    model = MLLMMSR.create(options, items, seed=seed)
    timings["load_seconds"] = time.perf_counter() - t0
    with build_summariser(options.summaries, cache, items) as summariser:
        t0 = time.perf_counter()
        samples = build_training_samples(model, split, summariser, train_users, training, seed, console, quiet)
        timings["train_summary_seconds"] = time.perf_counter() - t0
        timings.update(fit_with_progress(model, samples, training, seed, console, quiet))
        scorer = MLLMMSRScorer(model, summariser, split, stage, training.score_batch_size, console, quiet)
        histories = [split.inputs_and_target(int(u), stage)[0] for u in eval_users]
        t0 = time.perf_counter()
        scores = scorer.score(pad_left(histories, scorer.max_len), torch.as_tensor(candidates, dtype=torch.long))
        timings["eval_seconds"] = time.perf_counter() - t0
        timings["summary_calls"] = float(summariser.backend.calls)
    timings["score_seconds"] = scorer.score_seconds
    timings["eval_summary_seconds"] = timings["eval_seconds"] - scorer.score_seconds
    timings["score_candidates"] = float(scorer.candidates_scored)
    timings["score_candidates_per_s"] = scorer.candidates_scored / scorer.score_seconds
    timings["prompt_tokens_per_candidate"] = scorer.prompt_tokens / max(1, scorer.candidates_scored)
    timings["train_prompt_tokens_per_sample"] = (sum(model.prompt_tokens([s.prompt for s in samples]))
                                                 / max(1, len(samples)))
    timings["prompts_with_image"] = float(model.prompts_with_image)
    timings["prompts_text_only"] = float(model.prompts_text_only)
    ranks = rank_of_positive(scores)
    metrics = {k: float(v.mean()) for k, v in metrics_from_ranks(ranks, sorted(set(ks))).items()}
    return model, TrainScoreResult(np.asarray(eval_users), scores, metrics, timings)


def fit_with_progress(model: MLLMMSR, samples: list[PromptSample], training: MLLMMSRTrainingOptions, seed: int,
                      console: Console | None = None, quiet: bool = False) -> dict[str, float]:
    with progress_bar(console, quiet) as progress:
        task = progress.add_task("LoRA fine-tuning (samples)", total=len(samples) * training.epochs)
        return model.fit(samples, training, seed, lambda n, _loss: progress.advance(task, n))
