"""MLLM-MSR throughput before/after the speed-ups: scoring candidates/s and LoRA training samples/s.

Same model (SmolLM2-135M-Instruct, ``make llm``), same MovieLens users, candidates and training prompts, in one
invocation:

* **reference** ("before", the code as it was): one thread, every prompt run whole
  (``reuse_prompt_prefix = false``), scoring batches of 8 prompts (the earlier benchmarks' setting);
* **prefix reuse, 1 thread**: the prompt part a user's candidates share (chat header, user summary, recent
  items) runs once and its KV cache serves every candidate; training batches are whole groups (a user's
  positive and negatives) and backpropagate through that cache;
* **prefix reuse, 2 threads** ("after"): the same on both cores, scoring a user's 21 candidates in one batch.

The scores with and without prefix reuse are compared on every candidate (``max_abs_score_diff``).
User summaries are NOT generated here (they are cached text for the recommender and cost the same either way):
each user gets a fixed summary sentence of typical length (about 60 tokens), so only the recommender is timed.

Run::

    flock /tmp/prismrec-bench.lock .venv/bin/python benchmarks/llm_speed.py
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from rich.console import Console

from _common import write_results
from prismrec.data.loaders import load_sequences
from prismrec.data.split import LeaveOneOutSplit
from prismrec.evaluation.evaluators import SampledRankingEvaluator
from prismrec.llmrec import mllm_msr as msr
from prismrec.llmrec.causal_lm import PACKAGED_SMOLLM2, CausalLMOptions
from prismrec.semantics.artefact import resolve_artefact_dir

console = Console(stderr=True)

SUMMARY = (f"{msr.SUMMARY_PREFIX} character-driven dramas and crime thrillers from the 1990s, with a taste "
           "for dark humour, strong ensemble casts and twisty plots; they also enjoy a well made science "
           "fiction adventure now and then, and seem to avoid romantic comedies.")


def prompts_for(model: msr.MLLMMSR, split: LeaveOneOutSplit, users: np.ndarray,
                candidates: np.ndarray) -> list[msr.RecommenderPrompt]:
    out = []
    for user, row in zip(users, candidates, strict=True):
        history = split.inputs_and_target(int(user), "test")[0][-20:]
        out += [model.prompt(SUMMARY, history, int(c)) for c in row]
    return out


def training_samples(model: msr.MLLMMSR, split: LeaveOneOutSplit, users: np.ndarray,
                     negatives: int, seed: int) -> list[msr.PromptSample]:
    rng = np.random.default_rng(seed)
    samples = []
    for user in users:
        sequence = split.train_sequence(int(user))
        samples.append(msr.PromptSample(model.prompt(SUMMARY, sequence[-21:-1], int(sequence[-1])), True))
        for item in msr.negatives_for(split, int(user), negatives, rng):
            samples.append(msr.PromptSample(model.prompt(SUMMARY, sequence[-21:-1], item), False))
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--score-users", type=int, default=2, help="users scored, 21 candidates each")
    parser.add_argument("--train-users", type=int, default=4, help="users trained on (1 positive + negatives)")
    parser.add_argument("--negatives", type=int, default=3, help="sampled negatives per training positive")
    parser.add_argument("--semantics", default="movielens-small-describe")
    parser.add_argument("--model", default=PACKAGED_SMOLLM2, help="the LLM: SmolLM2 (make llm) or a local folder")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    started = time.perf_counter()
    split = LeaveOneOutSplit(load_sequences("movielens-small"))
    users = msr.sample_users(split, args.score_users + args.train_users, args.seed)
    score_users, train_users = users[:args.score_users], users[args.score_users:]
    evaluator = SampledRankingEvaluator(split, num_negatives=20, seed=42)
    targets = np.array([split.inputs_and_target(int(u), "test")[1] for u in score_users])
    candidates = np.concatenate([targets[:, None], evaluator.negatives[score_users]], axis=1)
    items = msr.ItemTextOptions(semantics=str(resolve_artefact_dir(args.semantics)))
    options = msr.MLLMMSROptions(llm=CausalLMOptions(model=args.model), items=items)
    training = msr.MLLMMSRTrainingOptions(lr=1e-4, epochs=1, batch_size=8)

    settings = [("reference", 1, False, 8), ("prefix reuse, 1 thread", 1, True, 21),
                ("prefix reuse, 2 threads", 2, True, 21)]
    rows, scores, flat = [], {}, {}
    for label, threads, reuse, score_batch in settings:
        torch.set_num_threads(threads)
        model = msr.MLLMMSR.create(options.model_copy(update={"reuse_prompt_prefix": reuse}),
                                   msr.ItemTexts(split.dataset, options.items), seed=args.seed)
        prompts = prompts_for(model, split, score_users, candidates)
        t0 = time.perf_counter()
        scores[label] = model.score_prompts(prompts, batch_size=score_batch)
        score_rate = len(prompts) / (time.perf_counter() - t0)
        samples = training_samples(model, split, train_users, args.negatives, args.seed)
        fitted = model.fit(samples, training, seed=args.seed)
        tokens = float(np.mean(model.prompt_tokens(prompts)))
        console.print(f"{label}: {score_rate:.2f} candidates/s, {fitted['train_samples_per_s']:.2f} samples/s")
        rows.append((label, threads, score_rate, fitted["train_samples_per_s"]))
        key = {"reference": "before", "prefix reuse, 1 thread": "reuse_1thread",
               "prefix reuse, 2 threads": "after"}[label]
        flat[f"{key}_score_candidates_per_s"] = score_rate
        flat[f"{key}_train_samples_per_s"] = fitted["train_samples_per_s"]
        flat["prompt_tokens_per_candidate"] = tokens
    ids = model.tokenizer([msr.prompt_text(p) for p in prompts], add_special_tokens=False)["input_ids"]
    shared = [msr.common_prefix_length(ids[k:k + 21]) for k in range(0, len(ids), 21)]
    flat["shared_prefix_tokens_per_user"] = float(np.mean(shared))
    flat["max_abs_score_diff"] = float((scores["prefix reuse, 1 thread"] - scores["reference"]).abs().max())
    flat["score_speedup"] = flat["after_score_candidates_per_s"] / flat["before_score_candidates_per_s"]
    flat["train_speedup"] = flat["after_train_samples_per_s"] / flat["before_train_samples_per_s"]
    flat.update({"llm": args.model, "score_candidates": len(prompts), "train_samples": len(samples), "seed": args.seed,
                 "total_seconds": time.perf_counter() - started})
    table = ["| setting | threads | scoring, candidates/s | LoRA training, samples/s |", "|---|---:|---:|---:|"]
    table += [f"| {label} | {threads} | {s:.2f} | {t:.2f} |" for label, threads, s, t in rows]
    table += [f"| **speed-up, after / before** | | **{flat['score_speedup']:.1f}x** | "
              f"**{flat['train_speedup']:.1f}x** |"]
    llm = "SmolLM2-135M-Instruct" if args.model == PACKAGED_SMOLLM2 else args.model
    notes = f"""Setting: {llm} (float32 CPU), {len(prompts)} candidates ({args.score_users} MovieLens
users x (test item + the evaluators' 20 cached negatives)), {len(samples)} training prompts ({args.train_users} other
users x (last training item + {args.negatives} sampled negatives)), batch 8, one epoch. Prompts average
{flat['prompt_tokens_per_candidate']:.0f} tokens, of which {flat['shared_prefix_tokens_per_user']:.0f} are shared by a
user's candidates (computed once with prefix reuse). Scores with and without prefix reuse differ by at most
{flat['max_abs_score_diff']:.1e} (float rounding). User summaries are a fixed sentence here (not timed); item texts are
title, year, genres and the `{args.semantics}` image summary (30 words).

Machine: the shared 2-core machine; figures from one invocation, in the order of the table."""
    write_results("llm_speed", flat, "\n".join(table), notes)


if __name__ == "__main__":
    main()
