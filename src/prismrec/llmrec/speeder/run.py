"""A whole Speeder run (:func:`fit_run`, what ``prismrec speeder train`` does) and its inputs.

MRC's input matrices (:func:`load_modality_features`: the semantics artefact's text / image matrices and the
collaborative table, from a SASRec run with :func:`collaborative_table_from_sasrec_run` or trained on the spot
with :func:`train_sasrec_table`), prompt-cost figures for benchmarks (:func:`tokens_per_item`,
:func:`prompt_length_stats`), and the run directory :func:`fit_run` writes.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prismrec.data.dataset import SequenceDataset
from prismrec.data.split import LeaveOneOutSplit
from prismrec.evaluation.evaluators import SampledRankingEvaluator
from prismrec.llmrec.speeder.choice import evaluate_choice
from prismrec.llmrec.speeder.config import SpeederError, SpeederOptions, SpeederRunConfig
from prismrec.llmrec.speeder.model import Speeder
from prismrec.llmrec.speeder.training import train_speeder


def load_modality_features(options: SpeederOptions, dataset: SequenceDataset,
                           collaborative: np.ndarray | None) -> dict[str, np.ndarray]:
    """text / visual (and collaborative) matrices in ``dataset``'s item-id order (row 0 = padding)."""
    from prismrec.models.enhancers.adapters import load_semantic_matrices

    matrices = load_semantic_matrices(options.semantics, dataset, [options.text_matrix, options.image_matrix])
    features = {"text": matrices[options.text_matrix], "visual": matrices[options.image_matrix]}
    if options.collaborative == "sasrec":
        if collaborative is None:
            raise SpeederError("collaborative = 'sasrec' needs a SASRec item table (model.sasrec_run)")
        if collaborative.shape[0] != dataset.n_items + 1:
            raise SpeederError(f"collaborative table has {collaborative.shape[0]} rows; the dataset has "
                               f"{dataset.n_items} items + padding")
        features["collaborative"] = collaborative.astype(np.float32)
    return features


def collaborative_table_from_sasrec_run(run_dir: Path, dataset: SequenceDataset) -> np.ndarray:
    """The (frozen) item embedding table of a SASRec run trained on this very dataset."""
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    meta_path, weights = run_dir / "meta.json", run_dir / "model.safetensors"
    for path in (meta_path, weights):
        if not path.exists():
            raise SpeederError(f"{path}: missing; model.sasrec_run must be a finished SASRec run directory")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("data_fingerprint") != dataset.fingerprint:
        raise SpeederError(f"{meta_path}: trained on data {meta.get('data_fingerprint')}, not on this dataset "
                           f"({dataset.fingerprint}); train SASRec on the same data and filters")
    state = load_file(str(weights))
    key = "item_encoder.embedding.weight"
    if key not in state:
        raise SpeederError(f"{weights}: no {key!r}; is this a SASRec run?")
    table = state[key].float().numpy().copy()
    table[0] = 0.0
    return table


def train_sasrec_table(split: LeaveOneOutSplit, seed: int = 42, max_epochs: int = 20, hidden_size: int = 64,
                       run_dir: Path | None = None, quiet: bool = True) -> tuple[np.ndarray, Path]:
    """Train a small SASRec with the project's Trainer on the training split; return its item table."""
    from prismrec.config import RunConfig
    from prismrec.models.backbones.sasrec import SASRecConfig
    from prismrec.training.trainer import Trainer

    config = RunConfig(name="speeder-collaborative-sasrec", seed=seed,
                       data={"dataset": split.dataset.name},
                       model=SASRecConfig(hidden_size=hidden_size, max_len=50),
                       training={"max_epochs": max_epochs, "patience": max_epochs, "batch_size": 128},
                       evaluation={"full_ranking": False})
    outcome = Trainer(config, split=split, run_dir=run_dir, quiet=quiet).fit()
    return collaborative_table_from_sasrec_run(outcome.run_dir, split.dataset), outcome.run_dir


def tokens_per_item(options: SpeederOptions) -> int:
    """Prompt tokens that represent one item (the compressed representation)."""
    return options.n_item_tokens


def prompt_length_stats(model: Speeder, histories: Sequence[np.ndarray]) -> dict[str, float]:
    """Mean prompt tokens of a ranking prompt (the one pass that scores every candidate)."""
    lengths = [model.prompts.build([h]).n_tokens for h in histories]
    return {"mean_prompt_tokens": float(np.mean(lengths)) if lengths else math.nan}


# -- a whole run (what ``prismrec speeder train`` does) --------------------------------------------------

SPEEDER_WEIGHTS = "speeder.safetensors"


def fit_run(config: SpeederRunConfig, run_dir: Path | None = None, quiet: bool = False) -> dict[str, Any]:
    """Train Speeder (MPO stages) and evaluate it; everything lands in a run directory.

    ``run_dir`` (default ``$PRISMREC_HOME/runs/<name>-<timestamp>``) receives ``config.toml``, ``meta.json``
    (seed, package versions, data fingerprint), ``stages.jsonl`` (one line per MPO stage with its
    validation metrics), ``speeder.safetensors`` (MRC, position embeddings, scoring head; the LLM is not
    copied), ``lora/`` (the adapter, via llmrec.causal_lm), ``final.json`` (test/valid metrics).
    """
    import platform
    import sys

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from safetensors.torch import save_file

    from prismrec.data.loaders import load_sequences
    from prismrec.llmrec.causal_lm import CausalLMOptions, LoRAOptions, add_lora, load_causal_lm, save_lora_adapter
    from prismrec.options import dump_toml
    from prismrec.training.runs import new_run_dir, package_versions, write_json

    console = Console(stderr=True, quiet=quiet)
    if config.training.num_threads:
        torch.set_num_threads(config.training.num_threads)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    split = LeaveOneOutSplit(load_sequences(config.data.dataset, config.data.data_dir))
    dataset = split.dataset
    run_dir = Path(run_dir) if run_dir is not None else new_run_dir(config.name)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(dump_toml(config.model_dump(mode="json")), encoding="utf-8")
    meta: dict[str, Any] = {"seed": config.seed, "data_fingerprint": dataset.fingerprint,
                            "n_users": dataset.n_users, "n_items": dataset.n_items, "packages": package_versions(),
                            "platform": platform.platform(), "command": sys.argv,
                            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    collaborative = None
    if config.model.collaborative == "sasrec":
        if config.model.sasrec_run is not None:
            collaborative = collaborative_table_from_sasrec_run(config.model.sasrec_run, dataset)
            meta["sasrec_run"] = str(config.model.sasrec_run)
        else:
            console.print("training the SASRec that gives the collaborative embeddings")
            collaborative, sasrec_dir = train_sasrec_table(split, seed=config.seed, quiet=quiet)
            meta["sasrec_run"] = str(sasrec_dir)
    write_json(run_dir / "meta.json", meta)
    features = load_modality_features(config.model, dataset, collaborative)
    llm, tokenizer = load_causal_lm(CausalLMOptions(model=config.llm.model))
    lora = LoRAOptions(r=config.llm.lora_r, alpha=config.llm.lora_alpha, dropout=config.llm.lora_dropout)
    torch.manual_seed(config.seed)
    llm = add_lora(llm, lora)
    model = Speeder(llm, tokenizer, features, config.model)
    ev = config.evaluation
    evaluator = SampledRankingEvaluator(split, ev.num_negatives, ev.negative_seed, ev.ks, ev.batch_size)
    stages_log = (run_dir / "stages.jsonl").open("w", encoding="utf-8")

    def log(record: dict[str, Any]) -> None:
        stages_log.write(json.dumps(record) + "\n")
        stages_log.flush()

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console, disable=quiet)
    with progress, stages_log:
        records = train_speeder(model, split, config.training, config.seed, evaluator=evaluator,
                                valid_users=split.eval_users[:config.training.valid_users], progress=progress,
                                log=log)
    save_file(model.own_state(), str(run_dir / SPEEDER_WEIGHTS))
    save_lora_adapter(model.llm, run_dir / "lora", lora)
    users = split.eval_users if ev.users is None else split.eval_users[:ev.users]
    final: dict[str, dict[str, float]] = {}
    for stage in ("valid", "test"):
        final[f"{stage}/sampled"] = evaluator.evaluate(model, stage, users=users).summary()
        final[f"{stage}/choice"] = evaluate_choice(model, split, stage, users, ev.negative_seed, ev.batch_size)
    summary = {"metrics": final, "stages": [r.as_dict() for r in records], "evaluated_users": len(users),
               "train_seconds": sum(r.seconds for r in records)}
    write_json(run_dir / "final.json", summary)
    return {"run_dir": run_dir, **summary}
