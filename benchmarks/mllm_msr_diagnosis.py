"""Why MLLM-MSR does or does not learn on MovieLens with SmolLM2-135M: diagnostics on the quality benchmark's data.

Runs after ``benchmarks/llm_recommenders.py`` (same options, same ``--work-dir``): it rebuilds the benchmark's
2,000 training prompts from the cached user summaries (no generation) and its validation candidates, then

1. **fit vs generalisation**: AUC of p(yes) between positives and negatives, and the positive's rank among a
   user's candidates (N@10, Hit@1), on a seeded sample of *training* users' training prompts and on the
   validation users' 21 candidates, for the untrained model (LoRA's B = 0: the base LLM) and the benchmark's
   best adapter; next to the AUC of the candidate's training-split popularity on the same prompts (the signal
   a ranker could use) and the rank correlation of p(yes) with popularity;
2. **the training-loss curve** against the loss of predicting the label's base rate (1 in 1 + negatives),
   which a model that ignores the prompt reaches;
3. **where the gradient goes**: the share of |d loss / d input embedding| per prompt segment (chat header and
   user summary, recent items, candidate text, question), on training prompts;
4. **a learning-rate check on validation**: fresh adapters trained on the benchmark's first round of prompts
   at other learning rates, each scored by validation N@10 (the benchmark's own rule; test users unread).

Writes ``benchmarks/results/mllm_msr_diagnosis.{md,json}``. Run::

    flock /tmp/prismrec-bench.lock .venv/bin/python benchmarks/mllm_msr_diagnosis.py
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import mannwhitneyu, spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llm_recommenders as bench
from _common import command_line
from prismrec.data.loaders import load_sequences
from prismrec.data.split import LeaveOneOutSplit
from prismrec.evaluation.evaluators import SampledRankingEvaluator
from prismrec.llmrec import mllm_msr as msr
from prismrec.llmrec.mllm_msr.prompts import prompt_text
from prismrec.llmrec.mllm_msr.recommender import PREFIX_END
from prismrec.semantics.cache import SemanticCache

RESULTS = Path(__file__).resolve().parent / "results"
SEGMENTS = ("header + summary", "recent items", "candidate", "question")


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties counted half (Mann-Whitney U)."""
    positives, negatives = scores[labels], scores[~labels]
    return float(mannwhitneyu(positives, negatives).statistic / (len(positives) * len(negatives)))


def group_metrics(scores: np.ndarray, group: int) -> dict[str, float]:
    """Rows of ``group`` scores, the positive first: N@10 and Hit@1 of the positive within its row."""
    rows = scores.reshape(-1, group)
    metrics = bench.per_user_metrics(rows)
    return {"ndcg10": float(metrics["ndcg@10"].mean()), "hit1": float(metrics["hit@1"].mean())}


def segment_of(text: str, offsets: Sequence[tuple[int, int]]) -> list[int]:
    """The segment index of every token (offsets into ``text``) of a rendered recommender prompt."""
    bounds = [text.index("\nRecently the user"), text.index(PREFIX_END),
              text.index("\nWill the user")]
    return [sum(start >= b for b in bounds) for start, _ in offsets]


def gradient_shares(model: msr.MLLMMSR, samples: Sequence[msr.PromptSample]) -> dict[str, float]:
    """Mean share of the input-embedding gradient's L2 norm per segment (one prompt at a time, no padding)."""
    embed = model.model.get_input_embeddings()
    totals = np.zeros(len(SEGMENTS))
    model.model.eval()  # no LoRA dropout: the gradient of the model as it scores
    for sample in samples:
        text = prompt_text(sample.prompt)
        encoded = model.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = torch.tensor([encoded["input_ids"]])
        inputs = embed(ids).detach().requires_grad_(True)
        logits = model.model(inputs_embeds=inputs, attention_mask=torch.ones_like(ids), logits_to_keep=1).logits[:, -1]
        target = torch.tensor([model.yes_id if sample.label else model.no_id])
        torch.nn.functional.cross_entropy(logits.float(), target).backward()
        norms = inputs.grad[0].norm(dim=-1).numpy()
        segments = np.array(segment_of(text, encoded["offset_mapping"]))
        shares = np.array([norms[segments == s].sum() for s in range(len(SEGMENTS))])
        totals += shares / shares.sum()
        model.model.zero_grad(set_to_none=True)
    return {name: float(value / len(samples)) for name, value in zip(SEGMENTS, totals, strict=True)}


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-users-scored", type=int, default=40, help="training users whose prompts are scored")
    parser.add_argument("--gradient-prompts", type=int, default=16)
    parser.add_argument("--lrs", default="1e-3,3e-5", help="learning rates of the check (comma-separated)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    own, rest = parser.parse_known_args(argv)
    return own, bench.parse_args(rest)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    own, args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    work = Path(args.work_dir)
    best = work / "mllm_msr" / "adapter"
    record_path = work / "mllm_msr" / "training.json"
    if not best.exists() or not record_path.exists():
        raise SystemExit(f"{work}: no finished MLLM-MSR training; run benchmarks/llm_recommenders.py first")
    record = json.loads(record_path.read_text())
    split = LeaveOneOutSplit(load_sequences(args.dataset, args.data_dir))
    evaluator = SampledRankingEvaluator(split, num_negatives=bench.NUM_NEGATIVES, seed=42)
    test_users, valid_users = bench.choose_users(split, args.test_users, args.valid_users, args.seed)
    valid_candidates = bench.candidates_for(split, valid_users, "valid", evaluator)
    counts = np.zeros(split.dataset.n_items + 1)
    for sequence in split.train_sequences:
        np.add.at(counts, sequence, 1)

    options = bench.mllm_msr_options(args)
    items = msr.ItemTexts(split.dataset, options.items)
    group = 1 + args.mllm_negatives
    training = msr.MLLMMSRTrainingOptions(lr=args.mllm_lr, epochs=1, batch_size=group, positives_per_user=1,
                                          negatives_per_positive=args.mllm_negatives)
    train_users = bench.select_train_users(split, args.mllm_train_users, test_users, valid_users, args.seed)
    flat: dict[str, Any] = {"n_valid_users": len(valid_users), "train_samples": record["train_samples"],
                            "label_base_rate_loss": float(-(np.log(1 / group) / group
                                                            + (group - 1) / group * np.log((group - 1) / group)))}
    with SemanticCache(work / "summaries.sqlite") as cache, \
            msr.build_summariser(options.summaries, cache, items) as summariser:
        base = msr.MLLMMSR.create(options, items, seed=args.seed)  # fresh LoRA: B = 0, the base LLM's scores
        samples = msr.build_training_samples(base, split, summariser, train_users, training, args.seed,
                                             bench.console, True)
        firsts = list(range(0, len(samples), group))
        rng = np.random.default_rng(args.seed)
        scored_users = np.sort(rng.choice(len(firsts), size=min(own.train_users_scored, len(firsts)),
                                          replace=False))
        scored = [samples[firsts[u] + k] for u in scored_users for k in range(group)]
        train_labels = np.array([s.label for s in scored], dtype=bool)
        train_items = np.array([split.train_sequence(int(train_users[u]))[-1] if k == 0 else -1
                                for u in scored_users for k in range(group)])
        # the candidate of every scored prompt, for the popularity reference (negatives in sample order)
        by_text = {items.text(i): i for i in range(1, split.dataset.n_items + 1)}
        candidates = []
        for row, sample in enumerate(scored):
            candidates.append(int(train_items[row]) if sample.label else _candidate_item(sample, by_text))
        train_popularity = counts[np.array(candidates)]
        valid_labels = np.zeros(valid_candidates.shape, dtype=bool)
        valid_labels[:, 0] = True
        valid_popularity = counts[valid_candidates]
        flat["popularity_auc_train"] = auc(train_popularity, train_labels)
        flat["popularity_auc_valid"] = auc(valid_popularity.ravel(), valid_labels.ravel())
        flat["popularity_ndcg10_valid"] = group_metrics(valid_popularity.astype(float), valid_candidates.shape[1])[
            "ndcg10"]

        def evaluate(model: msr.MLLMMSR, name: str) -> None:
            on_train = model.score_prompts([s.prompt for s in scored]).double().numpy()
            on_valid = bench.score_mllm_msr(model, summariser, split, valid_users, valid_candidates, "valid",
                                            args).double().numpy()
            flat[f"{name}_auc_train"] = auc(on_train, train_labels)
            flat[f"{name}_auc_valid"] = auc(on_valid.ravel(), valid_labels.ravel())
            for key, value in group_metrics(on_train, group).items():
                flat[f"{name}_{key}_train_of_{group}"] = value
            for key, value in group_metrics(on_valid, valid_candidates.shape[1]).items():
                flat[f"{name}_{key}_valid"] = value
            flat[f"{name}_spearman_popularity_valid"] = float(spearmanr(on_valid.ravel(),
                                                                        valid_popularity.ravel()).statistic)
            flat[f"{name}_pyes_mean_valid"] = float(on_valid.mean())
            flat[f"{name}_pyes_std_valid"] = float(on_valid.std())

        evaluate(base, "untrained")
        flat["gradient_share_untrained"] = gradient_shares(base, scored[:own.gradient_prompts])
        del base
        trained = msr.MLLMMSR.create(options, items, adapter=best)
        evaluate(trained, "trained")
        flat["gradient_share_trained"] = gradient_shares(trained, scored[:own.gradient_prompts])
        del trained

        # The benchmark's first round (the same users, in the same shuffled order), other learning rates.
        users_order = list(range(0, len(samples), group))
        random.Random(args.seed).shuffle(users_order)
        order = bench.user_grouped_order(users_order, group, len(samples))
        first_round = [samples[i] for i in order[:args.mllm_round]]
        lr_check: dict[str, dict[str, Any]] = {}
        for lr in [float(x) for x in own.lrs.split(",") if x]:
            model = msr.MLLMMSR.create(options, items, seed=args.seed)
            losses: list[float] = []
            model.fit(first_round, training.model_copy(update={"lr": lr}), seed=args.seed,
                      on_batch=lambda _n, loss, losses=losses: losses.append(loss))
            valid = bench.ndcg10(bench.score_mllm_msr(model, summariser, split, valid_users, valid_candidates,
                                                      "valid", args))
            tail = losses[len(losses) // 2:]
            lr_check[f"{lr:g}"] = {"valid_ndcg10": valid, "train_loss_second_half": float(np.mean(tail)),
                                   "train_loss_first_batches": float(np.mean(losses[:5]))}
            bench.console.print(f"lr {lr:g}: valid N@10 {valid:.4f}, training loss (2nd half) {np.mean(tail):.4f}")
            del model
    flat["lr_check"] = lr_check
    flat["benchmark_rounds"] = record["rounds"]
    flat["benchmark_lr"] = args.mllm_lr
    flat["chance_ndcg10"] = bench.chance_metrics(valid_candidates.shape[1])["ndcg@10"]
    flat["total_seconds"] = time.perf_counter() - started
    write_report(flat, own, args, group)
    return flat


def _candidate_item(sample: msr.PromptSample, by_text: dict[str, int]) -> int:
    """The item a prompt's candidate text belongs to (prompts keep the text only)."""
    text = prompt_text(sample.prompt).split(PREFIX_END, 1)[1].split("\nWill the user", 1)[0].strip()
    return int(by_text[text])


def write_report(flat: dict[str, Any], own: argparse.Namespace, args: argparse.Namespace, group: int) -> None:
    own.results_dir.mkdir(parents=True, exist_ok=True)
    (own.results_dir / "mllm_msr_diagnosis.json").write_text(json.dumps(flat, indent=2, sort_keys=True) + "\n")
    rows = ["| measure | untrained (base LLM) | trained (best adapter) | popularity |", "|---|---:|---:|---:|"]
    rows.append(f"| AUC of p(yes), {own.train_users_scored} training users' training prompts | "
                f"{flat['untrained_auc_train']:.3f} | {flat['trained_auc_train']:.3f} | "
                f"{flat['popularity_auc_train']:.3f} |")
    rows.append(f"| AUC of p(yes), {flat['n_valid_users']} validation users x 21 | {flat['untrained_auc_valid']:.3f} | "
                f"{flat['trained_auc_valid']:.3f} | {flat['popularity_auc_valid']:.3f} |")
    rows.append(f"| N@10 of the positive among its {group} (training prompts) | "
                f"{flat[f'untrained_ndcg10_train_of_{group}']:.3f} | "
                f"{flat[f'trained_ndcg10_train_of_{group}']:.3f} | |")
    rows.append(f"| validation N@10 (21 candidates; chance {flat['chance_ndcg10']:.3f}) | "
                f"{flat['untrained_ndcg10_valid']:.3f} | {flat['trained_ndcg10_valid']:.3f} | "
                f"{flat['popularity_ndcg10_valid']:.3f} |")
    rows.append(f"| Spearman(p(yes), popularity), validation candidates | "
                f"{flat['untrained_spearman_popularity_valid']:.3f} | {flat['trained_spearman_popularity_valid']:.3f}"
                " | |")
    rows.append(f"| p(yes) mean / std, validation candidates | {flat['untrained_pyes_mean_valid']:.3f} / "
                f"{flat['untrained_pyes_std_valid']:.3f} | {flat['trained_pyes_mean_valid']:.3f} / "
                f"{flat['trained_pyes_std_valid']:.3f} | |")
    grads = ["| segment | untrained | trained |", "|---|---:|---:|"]
    for name in SEGMENTS:
        grads.append(f"| {name} | {flat['gradient_share_untrained'][name]:.3f} | "
                     f"{flat['gradient_share_trained'][name]:.3f} |")
    curve = ["| prompts seen | training loss (round mean) | validation N@10 |", "|---:|---:|---:|"]
    for r in flat["benchmark_rounds"]:
        curve.append(f"| {r['samples']} | {r['train_loss']:.4f} | {r['valid_ndcg10']:.4f} |")
    lrs = ["| lr | validation N@10 after the first round | training loss, first 5 batches | 2nd half |",
           "|---:|---:|---:|---:|"]
    first = flat["benchmark_rounds"][0]
    lrs.append(f"| {flat['benchmark_lr']:g} (the benchmark) | {first['valid_ndcg10']:.4f} | | {first['train_loss']:.4f}"
               " (round mean) |")
    for lr, found in flat["lr_check"].items():
        lrs.append(f"| {lr} | {found['valid_ndcg10']:.4f} | {found['train_loss_first_batches']:.4f} | "
                   f"{found['train_loss_second_half']:.4f} |")
    body = f"""# mllm_msr_diagnosis

Command:

```bash
{command_line()}
```

The benchmark's own data (`benchmarks/llm_recommenders.py`, work directory `{args.work_dir}`): its
{flat['train_samples']} training prompts (1 positive + {group - 1} negatives per user) rebuilt from the cached
summaries, its {flat['n_valid_users']} validation users (validation item + 20 cached negatives). Test users are
not read.

## Fit and generalisation

{chr(10).join(rows)}

## Training loss against the label's base rate

A model that ignores the prompt and predicts p(yes) = 1/{group} everywhere has loss
{flat['label_base_rate_loss']:.4f}. The benchmark's rounds:

{chr(10).join(curve)}

## Where the gradient goes (share of |d loss / d input embeddings|, {own.gradient_prompts} training prompts)

{chr(10).join(grads)}

## Learning rate (validation only)

{chr(10).join(lrs)}

Whole diagnosis {flat['total_seconds']:.0f} s.
"""
    (own.results_dir / "mllm_msr_diagnosis.md").write_text(body)


if __name__ == "__main__":
    main()
