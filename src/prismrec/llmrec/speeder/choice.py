"""The choice task: 20-candidate lists and the Speeder authors' validity-aware Hit@1.

:func:`choice_candidates` builds each user's listed candidates (the held-out item plus cached evaluator
negatives, shuffled per user), :func:`validity_aware_hit_at_1` scores greedy answers (an answer that is not a
listed letter is a miss) and :func:`evaluate_choice` runs it over evaluation users.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from prismrec.data.split import LeaveOneOutSplit, Stage
from prismrec.evaluation.evaluators import SampledRankingEvaluator
from prismrec.llmrec.speeder.config import SpeederError
from prismrec.llmrec.speeder.model import Speeder


def choice_candidates(split: LeaveOneOutSplit, users: np.ndarray, stage: Stage, n_choices: int, seed: int,
                      cache_dir: Path | None = None,
                      negatives: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The 20-candidate lists: the held-out item + ``n_choices - 1`` negatives from our evaluator's cache
    (the same cached draw every model is scored on), shuffled per user with a seeded generator.

    ``negatives`` ((U, >= n_choices - 1), aligned with ``users``) overrides the cached draw, e.g. the first 19
    of the sampled-100 negatives, so a benchmark scores every model on the very same lists.
    Returns ``(candidates (U, n_choices), positive index (U,))``.
    """
    if negatives is None:
        evaluator = SampledRankingEvaluator(split, num_negatives=n_choices - 1, seed=seed, cache_dir=cache_dir)
        negatives = evaluator.negatives[np.asarray(users, dtype=np.int64)]
    if negatives.shape != (len(users), negatives.shape[1]) or negatives.shape[1] < n_choices - 1:
        raise SpeederError(f"negatives of shape {negatives.shape} for {len(users)} users; need >= {n_choices - 1} "
                           "per user")
    out = np.zeros((len(users), n_choices), dtype=np.int64)
    answer = np.zeros(len(users), dtype=np.int64)
    for row, user in enumerate(users):
        _, target = split.inputs_and_target(int(user), stage)
        listed = np.concatenate([[target], negatives[row, :n_choices - 1]])
        order = np.random.default_rng([seed, int(user)]).permutation(n_choices)
        out[row] = listed[order]
        answer[row] = int(np.flatnonzero(order == 0)[0])
    return out, answer


def validity_aware_hit_at_1(logits: torch.Tensor, letter_ids: Sequence[int], answers: torch.Tensor,
                            n_listed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy answer = arg-max over the whole vocabulary. Returns (hit (B,), valid (B,)) as float tensors:
    an answer that is not the letter of one of the ``n_listed`` candidates is invalid and a miss."""
    predicted = logits.argmax(dim=-1)
    letters = torch.tensor(list(letter_ids)[:n_listed], device=logits.device)
    valid = (predicted[:, None] == letters[None, :]).any(dim=1)
    hit = predicted == letters[answers.to(logits.device)]
    return (hit & valid).float(), valid.float()


@torch.no_grad()
def evaluate_choice(model: Speeder, split: LeaveOneOutSplit, stage: Stage, users: np.ndarray, seed: int = 42,
                    batch_size: int = 16, cache_dir: Path | None = None,
                    negatives: np.ndarray | None = None) -> dict[str, float]:
    """Validity-aware Hit@1 over ``n_choices`` listed candidates (one LLM pass per user)."""
    n = model.options.n_choices
    candidates, answers = choice_candidates(split, users, stage, n, seed, cache_dir, negatives)
    was_training = model.training
    model.eval()
    hits, valids = [], []
    try:
        for start in range(0, len(users), batch_size):
            chunk = slice(start, start + batch_size)
            histories = [split.inputs_and_target(int(u), stage)[0] for u in users[chunk]]
            batch = model.prompts.build(histories, candidates[chunk], answers[chunk])
            logits = model.choice_logits(model.hidden_states(batch), batch)
            hit, valid = validity_aware_hit_at_1(logits, model.prompts.letter_ids, torch.from_numpy(answers[chunk]), n)
            hits.append(hit.cpu())
            valids.append(valid.cpu())
    finally:
        model.train(was_training)
    hit_all, valid_all = torch.cat(hits), torch.cat(valids)
    return {"hit@1": float(hit_all.mean()), "valid_answer_rate": float(valid_all.mean())}
