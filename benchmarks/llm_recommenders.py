"""MLLM-MSR and Speeder on MovieLens next to chance, popularity and SASRec, all on exactly the same candidates.

Every test user is scored on its test item plus the evaluators' 20 cached negatives (MLLM-MSR's protocol,
``SampledRankingEvaluator(num_negatives=20, seed=42)``); H@1, H@5, H@10 and N@10 are averaged over users with
95% percentile-bootstrap intervals (``prismrec.evaluation.statistics.bootstrap_mean_ci``).

* **chance**: the expected metrics of a uniformly random order of the 21 candidates (exact);
* **popularity**: training-split interaction counts;
* **SASRec**: the project's Trainer on the training split, early-stopped on validation (``training.patience``);
* **MLLM-MSR**: LoRA on ``--mllm-train-users`` users' last *training* item ("yes"; the test and validation users
  are among them, as every user's training split is in SASRec's) and ``--mllm-negatives`` sampled unseen items
  each ("no"), user summaries by the same LLM (``local-llm``), trained in rounds of
  ``--mllm-round`` prompts with validation N@10 (``--valid-users`` users, disjoint from the test users, on
  their validation item + 20 negatives) after each round; the best round's adapter is kept, training stops
  after ``--patience`` rounds without improvement;
* **Speeder**: MPO's three stages with ``--speeder-targets`` next-item targets in all (split 1:1:2), validated
  every ``--speeder-round`` steps the same way, the best weights kept, each stage stopped after ``--patience``
  rounds without improvement; its collaborative embedding is the SASRec above.

Nothing is tuned on test users. Resumable: everything lands in ``--work-dir`` (default
``$PRISMREC_HOME/runs/llm-recommenders-<size>``): the SASRec run, ``mllm_msr/adapter``, ``speeder/`` weights,
each model's ``*_scores.npy`` (test scores, (users, 21), positive first) and the user-summary SQLite cache;
a rerun skips every finished training and scoring. ``--smoke`` runs every step at a tiny size.

Run (``make llm`` for SmolLM2; the semantics artefact from ``prismrec derive movielens-small``)::

    flock /tmp/prismrec-bench.lock .venv/bin/python benchmarks/llm_recommenders.py
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from rich.console import Console
from scipy.stats import binomtest

from _common import command_line
from prismrec.data.loaders import load_sequences
from prismrec.data.paths import output_dir
from prismrec.data.split import LeaveOneOutSplit, Stage
from prismrec.evaluation.evaluators import SampledRankingEvaluator, pad_left
from prismrec.evaluation.metrics import metrics_from_ranks, rank_of_positive
from prismrec.evaluation.statistics import bootstrap_mean_ci, compare_paired
from prismrec.llmrec import mllm_msr as msr
from prismrec.llmrec import speeder as spd
from prismrec.llmrec.causal_lm import PACKAGED_SMOLLM2, CausalLMOptions, LoRAOptions, add_lora, load_causal_lm
from prismrec.semantics.cache import SemanticCache

console = Console(stderr=True)
RESULTS = Path(__file__).resolve().parent / "results"
NUM_NEGATIVES = 20
METRICS = ("hit@1", "hit@5", "hit@10", "ndcg@10")
MODELS = ("chance", "popularity", "sasrec", "mllm_msr", "speeder")

SIZES: dict[str, dict[str, Any]] = {
    # >= 200 test users; 250 users x (1 + 7) = 2,000 MLLM-MSR prompts (a user's 8 prompts share their prefix, run
    # once in training); 2,000 Speeder targets. Image summaries capped at 15 words: every LLM call here is
    # bound by the tokens it reads (~370 tokens/s for SmolLM2 on 2 cores), and 30 words cost ~25 tokens more
    # per item in every summary call and every candidate.
    "full": {"test_users": 200, "valid_users": 30, "mllm_train_users": 250, "mllm_negatives": 7, "mllm_round": 504,
             "mllm_epochs": 1, "speeder_targets": 2000, "speeder_round": 25, "sasrec_epochs": 200, "history": 9,
             "summary_tokens": 48, "item_words": 15, "patience": 2},
    "smoke": {"test_users": 6, "valid_users": 3, "mllm_train_users": 4, "mllm_negatives": 1, "mllm_round": 4,
              "mllm_epochs": 1, "speeder_targets": 48, "speeder_round": 2, "sasrec_epochs": 2, "history": 3,
              "summary_tokens": 4, "item_words": 15, "patience": 1},
}


# --- users, candidates, metrics ------------------------------------------------------------------------
def choose_users(split: LeaveOneOutSplit, test: int, valid: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint seeded samples of evaluable users: (test users, validation users), each sorted."""
    users = np.random.default_rng(seed).permutation(split.eval_users)
    if len(users) < test + valid:
        raise SystemExit(f"only {len(users)} evaluable users; {test} test + {valid} validation requested")
    return np.sort(users[:test]), np.sort(users[test:test + valid])


def candidates_for(split: LeaveOneOutSplit, users: np.ndarray, stage: Stage,
                   evaluator: SampledRankingEvaluator) -> np.ndarray:
    """(users, 21): the held-out item of ``stage`` first, then the user's 20 cached negatives."""
    targets = np.array([split.inputs_and_target(int(u), stage)[1] for u in users], dtype=np.int64)
    return np.concatenate([targets[:, None], evaluator.negatives[users]], axis=1)


def per_user_metrics(scores: np.ndarray) -> dict[str, np.ndarray]:
    ranks = rank_of_positive(torch.as_tensor(scores, dtype=torch.float64))
    found = metrics_from_ranks(ranks, [1, 5, 10])
    return {name: found[name].numpy() for name in METRICS}


def chance_metrics(n_candidates: int) -> dict[str, float]:
    """Expected metrics of a uniformly random order (the positive equally likely at every rank)."""
    ranks = np.arange(n_candidates)
    return {"hit@1": 1 / n_candidates, "hit@5": min(5, n_candidates) / n_candidates,
            "hit@10": min(10, n_candidates) / n_candidates,
            "ndcg@10": float(np.sum(1.0 / np.log2(ranks[:10] + 2.0)) / n_candidates)}


def histories(split: LeaveOneOutSplit, users: np.ndarray, stage: Stage, max_len: int) -> torch.Tensor:
    return pad_left([split.inputs_and_target(int(u), stage)[0] for u in users], max_len)


def ndcg10(scores: torch.Tensor | np.ndarray) -> float:
    return float(per_user_metrics(np.asarray(scores, dtype=np.float64))["ndcg@10"].mean())


# --- the reference models ------------------------------------------------------------------------------
def popularity_scores(split: LeaveOneOutSplit, candidates: np.ndarray) -> np.ndarray:
    counts = np.zeros(split.dataset.n_items + 1)
    for sequence in split.train_sequences:
        np.add.at(counts, sequence, 1)
    return counts[candidates]


def train_sasrec(split: LeaveOneOutSplit, args: argparse.Namespace, folder: Path) -> Path:
    """SASRec on the training split, early-stopped on validation N@10; resumes a killed run in ``folder``."""
    from prismrec.config import RunConfig
    from prismrec.models.backbones.sasrec import SASRecConfig
    from prismrec.training.trainer import Trainer

    if (folder / "final.json").exists():
        return folder
    config = RunConfig(name="llm-recommenders-sasrec", seed=args.seed,
                       data={"dataset": args.dataset, "data_dir": args.data_dir},
                       model=SASRecConfig(hidden_size=64, max_len=50),
                       training={"max_epochs": args.sasrec_epochs, "patience": 20, "batch_size": 128,
                                 "device": args.device},
                       evaluation={"full_ranking": False, "num_negatives": NUM_NEGATIVES})
    resume = (folder / "last.safetensors").exists()  # a killed SASRec run continues from its last epoch
    Trainer(config, split=split, run_dir=folder, quiet=args.quiet, resume=resume).fit()
    return folder


def sasrec_scores(split: LeaveOneOutSplit, run_dir: Path, users: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    from safetensors.torch import load_file

    from prismrec.training.runs import load_run_config
    from prismrec.training.trainer import BEST_CHECKPOINT, build_model

    config = load_run_config(run_dir)
    model = build_model(config, split)
    model.load_state_dict(load_file(str(run_dir / BEST_CHECKPOINT)))
    model.eval()
    with torch.no_grad():
        scores = model.score(histories(split, users, "test", model.max_len), torch.as_tensor(candidates))
    return scores.double().numpy()


# --- MLLM-MSR --------------------------------------------------------------------------------------------
def mllm_msr_options(args: argparse.Namespace) -> msr.MLLMMSROptions:
    # batch 16: 0.92 s per summary call on 2 cores against 1.26 at batch 8 (the prompt's tokens dominate)
    backend = {"model": args.model, "device": args.device, "max_tokens": args.summary_tokens, "batch_size": 16}
    if args.smoke:
        backend["min_tokens"] = args.summary_tokens  # a random tiny LM would stop at once
    return msr.MLLMMSROptions(
        llm=CausalLMOptions(model=args.model, device=args.device),
        items=msr.ItemTextOptions(semantics=args.semantics if args.item_summaries else None,
                                  max_summary_words=args.item_words),
        summaries=msr.SummaryOptions(max_history=args.history, backend_options=backend))


def select_train_users(split: LeaveOneOutSplit, count: int, test_users: np.ndarray, valid_users: np.ndarray,
                       seed: int) -> np.ndarray:
    """``count`` users (sorted): the evaluated users first, then a seeded sample of the rest."""
    first = np.unique(np.concatenate([test_users, valid_users]))[:count]
    rest = np.setdiff1d(split.eval_users, first)
    extra = np.random.default_rng(seed).choice(rest, size=min(max(0, count - len(first)), len(rest)), replace=False)
    return np.sort(np.concatenate([first, extra]).astype(np.int64))


def user_grouped_order(firsts: Sequence[int], group: int, n_samples: int) -> list[int]:
    """Sample indices user by user, in the order of ``firsts`` (each user's first sample; a user's ``group``
    samples are consecutive): how a round is cut so that it holds whole users."""
    return [i for first in firsts for i in range(first, min(first + group, n_samples))]


def score_mllm_msr(model: msr.MLLMMSR, summariser: msr.UserSummariser, split: LeaveOneOutSplit, users: np.ndarray,
                   candidates: np.ndarray, stage: Stage, args: argparse.Namespace) -> torch.Tensor:
    scorer = msr.MLLMMSRScorer(model, summariser, split, stage, NUM_NEGATIVES + 1, console, args.quiet)
    return scorer.score(histories(split, users, stage, scorer.max_len), torch.as_tensor(candidates))


def run_mllm_msr(split: LeaveOneOutSplit, args: argparse.Namespace, work: Path, test_users: np.ndarray,
                 test_candidates: np.ndarray, valid_users: np.ndarray,
                 valid_candidates: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    folder = work / "mllm_msr"
    scores_path, record_path = folder / "test_scores.npy", folder / "training.json"
    if scores_path.exists() and record_path.exists():
        return np.load(scores_path), json.loads(record_path.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    options = mllm_msr_options(args)
    items = msr.ItemTexts(split.dataset, options.items)
    # A batch is one user's positive and its negatives (their prefix runs once).
    training = msr.MLLMMSRTrainingOptions(lr=args.mllm_lr, epochs=1, batch_size=1 + args.mllm_negatives,
                                          positives_per_user=1, negatives_per_positive=args.mllm_negatives)
    # Training prompts come from the *training* split (each user's last training item, never a validation or
    # test item), as SASRec's do: the test and validation users first (their validation and test summaries
    # then extend cached training ones, one call each), topped up with a seeded sample of the others.
    train_users = select_train_users(split, args.mllm_train_users, test_users, valid_users, args.seed)
    best = folder / "adapter"
    with SemanticCache(work / "summaries.sqlite") as cache, \
            msr.build_summariser(options.summaries, cache, items) as summariser:
        if not record_path.exists():
            model = msr.MLLMMSR.create(options, items, seed=args.seed)
            samples = msr.build_training_samples(model, split, summariser, train_users, training, args.seed,
                                                 console, args.quiet)
            record: dict[str, Any] = {"train_samples": len(samples), "train_users": len(train_users), "rounds": []}
            best_valid, stale, started = -1.0, 0, time.perf_counter()
            # Samples come user by user (a positive, then its negatives): shuffled as whole groups, so a
            # round holds whole users and fit() runs each user's shared prompt prefix once.
            group = 1 + args.mllm_negatives
            users_order = list(range(0, len(samples), group))
            for epoch in range(args.mllm_epochs):
                random.Random(args.seed + epoch).shuffle(users_order)
                order = user_grouped_order(users_order, group, len(samples))
                for start in range(0, len(order), args.mllm_round):
                    chunk = [samples[i] for i in order[start:start + args.mllm_round]]
                    fitted = model.fit(chunk, training, seed=args.seed + epoch * 1000 + start)
                    valid = ndcg10(score_mllm_msr(model, summariser, split, valid_users, valid_candidates, "valid",
                                                  args))
                    record["rounds"].append({"epoch": epoch, "samples": start + len(chunk), "valid_ndcg10": valid,
                                             "train_loss": fitted["train_loss"],
                                             "train_samples_per_s": fitted["train_samples_per_s"]})
                    console.print(f"MLLM-MSR epoch {epoch} prompts {start + len(chunk)}: valid N@10 {valid:.4f} "
                                  f"(loss {fitted['train_loss']:.4f})")
                    if valid > best_valid:
                        best_valid, stale = valid, 0
                        model.save_adapter(best)
                    else:
                        stale += 1
                    if stale >= args.patience:
                        break
                if stale >= args.patience:
                    break
            record.update({"best_valid_ndcg10": best_valid, "train_seconds": time.perf_counter() - started})
            record_path.write_text(json.dumps(record, indent=2) + "\n")
        model = msr.MLLMMSR.create(options, items, adapter=best)
        started = time.perf_counter()
        scores = score_mllm_msr(model, summariser, split, test_users, test_candidates, "test", args).double().numpy()
        record = json.loads(record_path.read_text())
        record["test_score_seconds"] = time.perf_counter() - started
        record_path.write_text(json.dumps(record, indent=2) + "\n")
    np.save(scores_path, scores)
    return scores, record


# --- Speeder ---------------------------------------------------------------------------------------------
def _trainable_state(model: spd.Speeder) -> dict[str, torch.Tensor]:
    """Speeder's own modules and the LoRA adapter (the frozen LLM is not copied)."""
    return {name: value.detach().clone() for name, value in model.state_dict().items()
            if not name.startswith("llm.") or "lora_" in name}


def run_speeder(split: LeaveOneOutSplit, args: argparse.Namespace, work: Path, sasrec_dir: Path,
                test_users: np.ndarray, test_candidates: np.ndarray, valid_users: np.ndarray,
                valid_candidates: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    from safetensors.torch import load_file, save_file

    folder = work / "speeder"
    scores_path, record_path = folder / "test_scores.npy", folder / "training.json"
    weights = folder / "best.safetensors"
    if scores_path.exists() and record_path.exists():
        return np.load(scores_path), json.loads(record_path.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    options = spd.SpeederOptions(semantics=args.semantics, image_matrix=args.image_matrix)
    collaborative = spd.collaborative_table_from_sasrec_run(sasrec_dir, split.dataset)
    features = spd.load_modality_features(options, split.dataset, collaborative)
    llm, tokenizer = load_causal_lm(CausalLMOptions(model=args.model, device=args.device))
    torch.manual_seed(args.seed)
    model = spd.Speeder(add_lora(llm, LoRAOptions()), tokenizer, features, options)
    if not record_path.exists():
        batch_size = 8
        steps = max(3, -(-args.speeder_targets // batch_size))
        stages = spd.default_stages()
        for stage, share in zip(stages, (0.25, 0.25, 0.5), strict=True):
            stage.steps = max(1, round(steps * share))
        evaluator = SampledRankingEvaluator(split, num_negatives=NUM_NEGATIVES, seed=42, ks=(10,))
        inputs = histories(split, valid_users, "valid", options.max_len)
        candidates = torch.as_tensor(valid_candidates)
        # "budget_samples": the targets offered; "train_samples": those trained before early stopping.
        record: dict[str, Any] = {"rounds": [], "train_samples": 0, "budget_samples": steps * batch_size}
        best_valid, started, seed = -1.0, time.perf_counter(), args.seed
        no_users = np.array([], dtype=np.int64)  # validation is done here, on the benchmark's own candidates
        for stage in stages:
            stale, done = 0, 0
            while done < stage.steps and stale < args.patience:
                n = min(args.speeder_round, stage.steps - done)
                seed += 1
                chunk = spd.SpeederTrainingOptions(stages=[stage.model_copy(update={"steps": n})],
                                                   batch_size=batch_size)
                spd.train_speeder(model, split, chunk, seed, evaluator=evaluator, valid_users=no_users)
                done += n
                record["train_samples"] += n * batch_size
                model.eval()
                with torch.no_grad():
                    valid = ndcg10(model.score(inputs, candidates).cpu())
                record["rounds"].append({"stage": stage.name, "steps": done, "valid_ndcg10": valid})
                console.print(f"Speeder {stage.name} step {done}/{stage.steps}: valid N@10 {valid:.4f}")
                if valid > best_valid:
                    best_valid, stale = valid, 0
                    record["best_modalities"] = list(stage.modalities)
                    save_file(_trainable_state(model), str(weights))
                else:
                    stale += 1
        record.update({"best_valid_ndcg10": best_valid, "train_seconds": time.perf_counter() - started})
        record_path.write_text(json.dumps(record, indent=2) + "\n")
    model.load_state_dict(load_file(str(weights)), strict=False)
    model.mrc.set_active(json.loads(record_path.read_text())["best_modalities"])  # the best round's experts
    model.eval()
    with torch.no_grad():
        scores = model.score(histories(split, test_users, "test", options.max_len),
                             torch.as_tensor(test_candidates)).double().cpu().numpy()
    np.save(scores_path, scores)
    return scores, json.loads(record_path.read_text())


# --- report ----------------------------------------------------------------------------------------------
def summarise(name: str, scores: np.ndarray | None, chance: dict[str, float], seed: int) -> dict[str, float]:
    out: dict[str, float] = {}
    if scores is None:
        for metric, value in chance.items():
            out[f"{name}_{_key(metric)}"] = value
        return out
    for metric, values in per_user_metrics(scores).items():
        low, high = bootstrap_mean_ci(values, seed=seed)
        out[f"{name}_{_key(metric)}"] = float(values.mean())
        out[f"{name}_{_key(metric)}_ci_low"] = low
        out[f"{name}_{_key(metric)}_ci_high"] = high
    return out


def _key(metric: str) -> str:
    return metric.replace("@", "")  # hit@10 -> hit10


def write_report(flat: dict[str, Any], args: argparse.Namespace, records: dict[str, dict[str, Any]]) -> None:
    lines = ["| model | H@1 | H@5 | H@10 [95% CI] | N@10 [95% CI] |", "|---|---:|---:|---:|---:|"]
    for name in MODELS:
        def cell(metric: str, ci: bool, name: str = name) -> str:
            value = flat[f"{name}_{metric}"]
            if not ci or f"{name}_{metric}_ci_low" not in flat:
                return f"{value:.3f}"
            return f"{value:.3f} [{flat[f'{name}_{metric}_ci_low']:.3f}, {flat[f'{name}_{metric}_ci_high']:.3f}]"
        lines.append(f"| {name} | {cell('hit1', False)} | {cell('hit5', False)} | {cell('hit10', True)} | "
                     f"{cell('ndcg10', True)} |")
    diffs = ["| comparison | H@10 difference [95% CI] | p (t / Wilcoxon) | N@10 difference [95% CI] "
             "| p (t / Wilcoxon) |",
             "|---|---:|---:|---:|---:|"]
    for a, b in COMPARISONS:
        cells = []
        for metric in ("hit10", "ndcg10"):
            key = f"{a}_minus_{b}_{metric}"
            wilcoxon = flat.get(key + "_p_wilcoxon", float("nan"))
            cells.append(f"{flat[key]:+.3f} [{flat[key + '_ci_low']:+.3f}, {flat[key + '_ci_high']:+.3f}] | "
                         f"{flat[key + '_p']:.2g} / " + ("-" if wilcoxon != wilcoxon else f"{wilcoxon:.2g}"))
        diffs.append(f"| {a} - {b} | {cells[0]} | {cells[1]} |")
    goals = [f"- MLLM-MSR H@10 lower CI bound above chance: {flat['mllm_msr_hit10_ci_low'] > flat['chance_hit10']}",
             f"- Speeder H@10 lower CI bound above chance: {flat['speeder_hit10_ci_low'] > flat['chance_hit10']}",
             f"- Speeder H@10 at or above popularity: {flat['speeder_hit10'] >= flat['popularity_hit10']}"]
    model = "SmolLM2-135M-Instruct" if args.model == PACKAGED_SMOLLM2 else args.model
    smoke = " (SMOKE: every step at a toy size; not a result)" if args.smoke else ""
    notes = f"""Size `{args.size}`{smoke}: {flat['n_users']} test users, each scored on its test item + the
evaluators' {NUM_NEGATIVES} cached negatives; validation on
{args.valid_users} other users (their validation item + the same negatives). LLM: {model}, {args.threads} CPU
thread(s). MLLM-MSR: {flat['train_samples_mllm_msr']} labelled prompts ({records['mllm_msr'].get('train_users')} users x
(1 + {args.mllm_negatives})), lr {args.mllm_lr:g}, rounds of {args.mllm_round} prompts, best validation round kept
(valid N@10 {records['mllm_msr'].get('best_valid_ndcg10', float('nan')):.4f}; {flat['trained_samples_mllm_msr']}
prompts trained when early stopping ended it); user summaries over the last {args.history} training items.
Speeder: a budget of {flat['train_samples_speeder']} next-item targets over its three MPO stages, validated every
{args.speeder_round} steps, best kept (valid N@10 {records['speeder'].get('best_valid_ndcg10', float('nan')):.4f};
{flat['trained_samples_speeder']} targets trained when early stopping had ended each stage).
SASRec: hidden 64, max_len 50, early-stopped on
validation. Chance is exact (a uniformly random order of {NUM_NEGATIVES + 1}). 95% percentile bootstrap over users.

Paired differences over the {flat['n_users']} test users (95% percentile bootstrap of the mean difference; against
chance, its exact expectation, with an exact binomial test for H@10 and a one-sample t-test for N@10):

{chr(10).join(diffs)}

Goals of issue 25:

{chr(10).join(goals)}

Training curves (validation N@10 per round) are in the work directory's `mllm_msr/training.json` and
`speeder/training.json`; whole benchmark {flat['total_seconds']:.0f} s (the sum over its invocations, listed in
the work directory's `invocations.json`)."""
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / f"{args.name}.json").write_text(json.dumps(flat, indent=2, sort_keys=True) + "\n")
    command = command_line() if args.argv is None else shlex.join(
        [".venv/bin/python", "benchmarks/llm_recommenders.py", *args.argv])
    body = (f"# {args.name}\n\nCommand:\n\n```bash\n{command}\n```\n\n" + "\n".join(lines) + "\n\n"
            + notes + "\n")
    (args.results_dir / f"{args.name}.md").write_text(body)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="every step at a tiny size (to check it runs)")
    parser.add_argument("--dataset", default="movielens-small")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--model", default=PACKAGED_SMOLLM2, help="SmolLM2 (make llm), a local HF folder or a GGUF")
    parser.add_argument("--semantics", default="movielens-small-describe", help="derivation artefact (name or folder)")
    parser.add_argument("--image-matrix", default="image", help="artefact matrix for Speeder's visual expert")
    parser.add_argument("--no-item-summaries", dest="item_summaries", action="store_false",
                        help="MLLM-MSR item texts without the artefact's image summaries (attributes only)")
    for name, value in SIZES["full"].items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=None,
                            help=f"default {value} (smoke: {SIZES['smoke'][name]})")
    parser.add_argument("--mllm-lr", type=float, default=3e-4,
                        help="LoRA learning rate (set before any run, not tuned: ~250 steps of 8 prompts)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (the LLMs and SASRec)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--name", default=None, help="results file name (default llm_recommenders[_smoke])")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    args.argv = None if argv is None else list(argv)
    args.size = "smoke" if args.smoke else "full"
    for name, value in SIZES[args.size].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.name = args.name or ("llm_recommenders_smoke" if args.smoke else "llm_recommenders")
    args.work_dir = args.work_dir or output_dir("runs") / f"llm-recommenders-{args.size}"
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    split = LeaveOneOutSplit(load_sequences(args.dataset, args.data_dir))
    evaluator = SampledRankingEvaluator(split, num_negatives=NUM_NEGATIVES, seed=42)
    test_users, valid_users = choose_users(split, args.test_users, args.valid_users, args.seed)
    test_candidates = candidates_for(split, test_users, "test", evaluator)
    valid_candidates = candidates_for(split, valid_users, "valid", evaluator)
    (work / "users.json").write_text(json.dumps({"test": test_users.tolist(), "valid": valid_users.tolist()}) + "\n")

    chance = chance_metrics(test_candidates.shape[1])
    sasrec_dir = train_sasrec(split, args, work / "sasrec")
    scores = {"popularity": popularity_scores(split, test_candidates),
              "sasrec": sasrec_scores(split, sasrec_dir, test_users, test_candidates)}
    scores["mllm_msr"], mllm_record = run_mllm_msr(split, args, work, test_users, test_candidates, valid_users,
                                                   valid_candidates)
    scores["speeder"], speeder_record = run_speeder(split, args, work, sasrec_dir, test_users, test_candidates,
                                                    valid_users, valid_candidates)
    # train_samples_*: the labelled prompts / next-item targets each model was offered (its budget);
    # trained_samples_*: how many it had seen when validation-based early stopping ended its training.
    speeder_budget = speeder_record.get("budget_samples", 8 * max(3, -(-args.speeder_targets // 8)))
    flat: dict[str, Any] = {"n_users": len(test_users), "n_candidates": int(test_candidates.shape[1]),
                            "train_samples_mllm_msr": mllm_record["train_samples"],
                            "trained_samples_mllm_msr": mllm_record["rounds"][-1]["samples"]
                            if mllm_record.get("rounds") else 0,
                            "train_samples_speeder": speeder_budget,
                            "trained_samples_speeder": speeder_record["train_samples"], "seed": args.seed,
                            "llm": args.model, "size": args.size}
    for name in MODELS:
        flat.update(summarise(name, scores.get(name), chance, args.seed))
    flat.update(compare(scores, chance, args.seed))
    flat["total_seconds"] = add_invocation(work, time.perf_counter() - started)
    write_report(flat, args, {"mllm_msr": mllm_record, "speeder": speeder_record})
    return flat


COMPARISONS = (("speeder", "popularity"), ("speeder", "sasrec"), ("sasrec", "popularity"),
               ("mllm_msr", "popularity"), ("mllm_msr", "chance"), ("speeder", "chance"))


def compare(scores: dict[str, np.ndarray], chance: dict[str, float], seed: int) -> dict[str, float]:
    """Paired differences over the test users (H@10, N@10): mean, 95% bootstrap interval, paired t-test and
    Wilcoxon p-values. Against chance the other side is its exact expectation for every user (H@10: exact
    binomial test, N@10: one-sample t-test)."""
    out: dict[str, float] = {}
    metrics = {name: per_user_metrics(values) for name, values in scores.items()}
    for a, b in COMPARISONS:
        for metric in ("hit@10", "ndcg@10"):
            ours = metrics[a][metric]
            theirs = metrics[b][metric] if b in metrics else np.full_like(ours, chance[metric])
            result = compare_paired(ours, theirs, seed=seed)
            key = f"{a}_minus_{b}_{_key(metric)}"
            out[key] = result.diff
            out[f"{key}_ci_low"], out[f"{key}_ci_high"] = result.ci95_low, result.ci95_high
            out[f"{key}_p"], out[f"{key}_p_wilcoxon"] = result.p_value, result.p_value_wilcoxon
            if b == "chance":
                # Against a constant the signed-rank test is meaningless for 0/1 hits (every hit outranks every
                # miss); H@10 gets the exact binomial test, N@10 the one-sample t-test.
                del out[f"{key}_p_wilcoxon"]
                if metric == "hit@10":
                    out[f"{key}_p"] = float(binomtest(int(ours.sum()), len(ours), chance[metric]).pvalue)
    return out


def add_invocation(work: Path, seconds: float) -> float:
    """Append this invocation's wall time to ``work/invocations.json``; the benchmark's time is their sum
    (a resumed benchmark counts every sitting; one that only re-reads finished scores adds a few seconds)."""
    path = work / "invocations.json"
    invocations = json.loads(path.read_text()) if path.exists() else []
    invocations.append({"finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seconds": seconds})
    path.write_text(json.dumps(invocations, indent=2) + "\n")
    return float(sum(i["seconds"] for i in invocations))


if __name__ == "__main__":
    main()
