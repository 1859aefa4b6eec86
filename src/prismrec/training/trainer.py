"""The training loop: Adam, early stopping on validation NDCG@10 (patience 20, paper 4.1.3), best
checkpoint as safetensors, per-epoch metrics as JSON lines, final metrics in both evaluation modes."""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from safetensors.torch import load_file, save_file

from prismrec.config import RunConfig
from prismrec.data.loaders import load_sequences
from prismrec.data.split import LeaveOneOutSplit
from prismrec.evaluation.evaluators import EvaluationResult, FullRankingEvaluator, SampledRankingEvaluator
from prismrec.models import MODELS, Recommender
from prismrec.training.runs import new_run_dir, write_json, write_run_header

console = Console()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_split(config: RunConfig) -> LeaveOneOutSplit:
    data = config.data
    sequences = load_sequences(data.dataset, data.data_dir, min_user_interactions=data.min_user_interactions,
                               min_item_interactions=data.min_item_interactions, options=data.options,
                               folder=data.folder)
    return LeaveOneOutSplit(sequences)


def build_model(config: RunConfig, split: LeaveOneOutSplit) -> Recommender:
    return MODELS.get(config.model.name).build(config.model, split)


@dataclass
class Evaluators:
    sampled: SampledRankingEvaluator
    full: FullRankingEvaluator | None

    @classmethod
    def from_config(cls, config: RunConfig, split: LeaveOneOutSplit) -> Evaluators:
        ev = config.evaluation
        device = config.training.device
        sampled = SampledRankingEvaluator(split, ev.num_negatives, ev.negative_seed, ev.ks, ev.batch_size, device)
        full = FullRankingEvaluator(split, ev.ks, ev.batch_size, device) if ev.full_ranking else None
        return cls(sampled, full)

    def final(self, model: Recommender) -> dict[str, dict[str, float]]:
        """``{"valid/sampled": {...}, "test/sampled": {...}, "valid/full": ..., "test/full": ...}``."""
        out: dict[str, dict[str, float]] = {}
        for evaluator in (self.sampled, self.full):
            if evaluator is None:
                continue
            for stage in ("valid", "test"):
                result: EvaluationResult = evaluator.evaluate(model, stage)  # type: ignore[arg-type]
                out[f"{stage}/{evaluator.mode}"] = result.summary()
        return out


@dataclass
class TrainingOutcome:
    run_dir: Path
    best_epoch: int
    best_valid: float
    final: dict[str, dict[str, float]]
    epochs_run: int
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)


class Trainer:
    """Trains one model from a :class:`RunConfig` and records everything in a run directory."""

    def __init__(self, config: RunConfig, split: LeaveOneOutSplit | None = None, run_dir: Path | None = None,
                 quiet: bool = False) -> None:
        self.config = config
        if config.training.num_threads:
            torch.set_num_threads(config.training.num_threads)
        seed_everything(config.seed)
        self.split = split or prepare_split(config)
        self.model = build_model(config, self.split).to(config.training.device)
        self.evaluators = Evaluators.from_config(config, self.split)
        self.run_dir = run_dir or new_run_dir(config.name)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.quiet = quiet
        self.rng = np.random.default_rng(config.seed)
        write_run_header(self.run_dir, config, self.split.dataset.fingerprint,
                         {"n_users": self.split.dataset.n_users, "n_items": self.split.dataset.n_items})

    def _train_users(self) -> np.ndarray:
        lengths = np.array([len(s) for s in self.split.train_sequences])
        return np.flatnonzero(lengths >= 2)  # a sequence of one item has nothing to predict

    def _epoch(self, optimizer: torch.optim.Optimizer, users: np.ndarray) -> float:
        cfg = self.config.training
        self.model.train()
        order = self.rng.permutation(users)
        train = self.split.train_sequences
        losses = []
        for start in range(0, len(order), cfg.batch_size):
            batch_users = order[start:start + cfg.batch_size]
            batch = self.model.training_batch([train[u] for u in batch_users], self.rng)
            batch = {k: v.to(cfg.device) for k, v in batch.items()}
            loss = self.model.training_loss(batch, cfg.loss)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            optimizer.step()
            losses.append(float(loss.detach()))
        return float(np.mean(losses)) if losses else float("nan")

    def fit(self) -> TrainingOutcome:
        cfg = self.config.training
        metric = cfg.early_stopping_metric
        start_time = time.perf_counter()
        checkpoint = self.run_dir / "model.safetensors"
        history: list[dict[str, Any]] = []
        best_value, best_epoch, epochs_run = float("-inf"), 0, 0
        if self.model.trainable and cfg.max_epochs > 0:
            optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
            users = self._train_users()
            stale = 0
            progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TextColumn("{task.fields[status]}"), console=console,
                                disable=self.quiet, transient=False)
            with progress, (self.run_dir / "metrics.jsonl").open("a", encoding="utf-8") as log:
                task = progress.add_task(f"train {self.config.model.name}", total=cfg.max_epochs, status="")
                for epoch in range(1, cfg.max_epochs + 1):
                    t0 = time.perf_counter()
                    loss = self._epoch(optimizer, users)
                    record: dict[str, Any] = {"epoch": epoch, "loss": loss, "train_seconds": time.perf_counter() - t0}
                    if epoch % cfg.eval_every == 0 or epoch == cfg.max_epochs:
                        valid = self.evaluators.sampled.evaluate(self.model, "valid").summary()
                        record["valid"] = valid
                        value = valid[metric]
                        if value > best_value:
                            best_value, best_epoch, stale = value, epoch, 0
                            save_file({k: v.contiguous() for k, v in self.model.state_dict().items()},
                                      str(checkpoint))
                        else:
                            stale += cfg.eval_every
                    history.append(record)
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                    epochs_run = epoch
                    progress.update(task, advance=1, status=f"loss {loss:.4f}  valid {metric} "
                                    f"{record.get('valid', {}).get(metric, float('nan')):.4f}  best {best_value:.4f} "
                                    f"@{best_epoch}")
                    if stale >= cfg.patience:
                        break
            self.model.load_state_dict(load_file(str(checkpoint)))
        else:
            save_file({k: v.contiguous() for k, v in self.model.state_dict().items()}, str(checkpoint))
        final = self.evaluators.final(self.model)
        seconds = time.perf_counter() - start_time
        write_json(self.run_dir / "final.json", {"best_epoch": best_epoch, "best_valid": best_value,
                                                 "epochs_run": epochs_run, "train_seconds": seconds,
                                                 "metrics": final})
        return TrainingOutcome(self.run_dir, best_epoch, best_value, final, epochs_run, seconds, history)


def evaluate_run(run_dir: Path, data_dir: Path | None = None) -> dict[str, dict[str, float]]:
    """Re-score a saved run from its config and best checkpoint."""
    from prismrec.training.runs import load_run_config

    config = load_run_config(run_dir)
    if data_dir is not None:
        config.data.data_dir = data_dir
    seed_everything(config.seed)
    split = prepare_split(config)
    meta = json.loads((Path(run_dir) / "meta.json").read_text())
    if meta.get("data_fingerprint") != split.dataset.fingerprint:
        console.print(f"[yellow]warning:[/yellow] data fingerprint {split.dataset.fingerprint} differs from the "
                      f"run's {meta.get('data_fingerprint')}: the data changed since training")
    model = build_model(config, split)
    model.load_state_dict(load_file(str(Path(run_dir) / "model.safetensors")))
    return Evaluators.from_config(config, split).final(model)
