"""The training loop: Adam, early stopping on validation NDCG@10 (patience 20, paper 4.1.3), best
checkpoint as safetensors, per-epoch metrics as JSON lines, final metrics in both evaluation modes.

Every epoch also leaves ``last.safetensors`` (model, optimizer, random states, early-stopping state; see
:mod:`prismrec.training.checkpoint`), so ``Trainer(config, run_dir=..., resume=True)`` (``prismrec train
--resume RUN_DIR``) continues a killed run and ends exactly where the uninterrupted run would have.
Under ``torchrun`` the same loop runs data parallel (:mod:`prismrec.training.distributed`).

``epoch_callback(epoch, record)`` is called after every epoch, once its record (loss, and ``valid`` on evaluation
epochs) is logged and checkpointed; an exception it raises (``prismrec tune``'s pruning raises
``optuna.TrialPruned``) ends ``fit`` there, leaving a run directory that ``--resume`` can continue.

Reproducibility: every random draw comes from generators seeded by ``config.seed`` (and saved in
checkpoints), so the same seed and config on the same machine give the same run. Bit-identical results are
guaranteed with ``training.num_threads = 1`` (what the determinism and resume tests use); with several CPU
threads on a heavily loaded machine we once saw a loss differ in its last digits (a different split of a
parallel reduction), the final metrics being identical.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from safetensors.torch import load_file, save_file
from torch import nn

from prismrec.config import RunConfig
from prismrec.data.loaders import load_sequences
from prismrec.data.split import LeaveOneOutSplit
from prismrec.evaluation.evaluators import EvaluationResult, FullRankingEvaluator, SampledRankingEvaluator
from prismrec.models import MODELS, Recommender
from prismrec.models.losses import NegativeSampler
from prismrec.training.checkpoint import (
    CheckpointError,
    EarlyStopping,
    RankRandomState,
    TrainingState,
    load_training_state,
    save_training_state,
)
from prismrec.training.distributed import DistributedContext, wrap_for_training
from prismrec.training.runs import new_run_dir, write_json, write_run_header

console = Console()

EpochCallback = Callable[[int, dict[str, Any]], None]

BEST_CHECKPOINT = "model.safetensors"
LAST_CHECKPOINT = "last.safetensors"


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
    def from_config(cls, config: RunConfig, split: LeaveOneOutSplit, device: str | None = None) -> Evaluators:
        ev = config.evaluation
        device = device or config.training.device
        sampled = SampledRankingEvaluator(split, ev.num_negatives, ev.negative_seed, ev.ks, ev.batch_size, device)
        full = FullRankingEvaluator(split, ev.ks, ev.batch_size, device, max_users=ev.full_ranking_users,
                                    seed=ev.negative_seed, chunk_size=ev.full_ranking_chunk,
                                    warn=lambda text: console.print(f"[yellow]warning:[/yellow] {text}")
                                    ) if ev.full_ranking else None
        return cls(sampled, full)

    def record(self) -> dict[str, Any]:
        """What final.json records about the evaluation (the full-ranking user sample)."""
        return {} if self.full is None else {"full_ranking": self.full.record()}

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
    resumed_from_epoch: int = 0


class TrainingLoss(nn.Module):
    """``forward(batch) -> loss``: what DistributedDataParallel wraps (it only hooks ``forward``)."""

    def __init__(self, model: Recommender, loss: str) -> None:
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model.training_loss(batch, self.loss)


def _state_dict_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def sliding_windows(sequences: list[np.ndarray], max_len: int) -> list[np.ndarray]:
    """Each history cut, from its end, into windows of ``max_len + 1`` items overlapping by one item.

    A model reading ``max_len`` items only ever sees the most recent ``max_len + 1`` of a history; with
    windows every transition of the history is a training target exactly once per epoch (RecBole gets the
    same coverage by making every prefix an instance, at ~``max_len`` times the cost).
    """
    rows: list[np.ndarray] = []
    for sequence in sequences:
        end = len(sequence)
        while end > 1:
            rows.append(sequence[max(0, end - max_len - 1):end])
            end -= max_len
    return rows


class Trainer:
    """Trains one model from a :class:`RunConfig` and records everything in a run directory.

    ``resume=True`` continues the run in ``run_dir`` from its ``last.safetensors`` (or from scratch when
    it was killed before finishing one epoch); the configuration must be the one the run was started with.
    """

    def __init__(self, config: RunConfig, split: LeaveOneOutSplit | None = None, run_dir: Path | None = None,
                 quiet: bool = False, resume: bool = False, epoch_callback: EpochCallback | None = None) -> None:
        self.config = config
        self.epoch_callback = epoch_callback
        self.dist = DistributedContext.from_env(config.training.device)
        self.device = self.dist.device(config.training.device)
        if config.training.num_threads:
            torch.set_num_threads(config.training.num_threads)
        if resume and run_dir is None:
            raise ValueError("resume=True needs the run directory to resume")
        self.resume = resume
        seed_everything(config.seed)
        self.split = split or prepare_split(config)
        self.model = build_model(config, self.split).to(self.device)
        self.train_rows = self._train_rows()
        if self.dist.enabled:  # same initial weights everywhere (DDP checks), distinct dropout per rank
            torch.manual_seed(config.seed + 7919 * self.dist.rank)
        # Rank 0 first: building the sampled evaluator may write the shared negatives cache.
        if not self.dist.is_main:
            self.dist.barrier()
        self.evaluators = Evaluators.from_config(config, self.split, self.device)
        if self.dist.is_main:
            self.dist.barrier()
        self.run_dir = Path(self.dist.broadcast(str(self._main_run_dir(run_dir)) if self.dist.is_main else None))
        self.quiet = quiet or not self.dist.is_main
        # The visiting order is shared by all ranks; what each rank samples for its own users is its own.
        self.order_rng = np.random.default_rng(config.seed)
        self.batch_rng = np.random.default_rng([config.seed, 1 + self.dist.rank])
        self.sampler = self._negative_sampler()
        self.pin_memory = torch.device(self.device).type == "cuda"

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    def _main_run_dir(self, run_dir: Path | None) -> Path:
        extra = {"n_users": self.split.dataset.n_users, "n_items": self.split.dataset.n_items,
                 "world_size": self.dist.world_size}
        if self.resume:
            assert run_dir is not None
            meta_path = Path(run_dir) / "meta.json"
            if not meta_path.exists():
                raise CheckpointError(f"{run_dir}: not a run directory (no meta.json)")
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            if meta.get("config_hash") != self.config.config_hash():
                raise CheckpointError(f"{run_dir}: its config.toml no longer matches the run it started "
                                      f"(hash {meta.get('config_hash')} vs {self.config.config_hash()})")
            if meta.get("data_fingerprint") != self.split.dataset.fingerprint:
                raise CheckpointError(f"{run_dir}: the data changed since this run started (fingerprint "
                                      f"{meta.get('data_fingerprint')} vs {self.split.dataset.fingerprint})")
            meta.setdefault("resumed", []).append(time.strftime("%Y-%m-%dT%H:%M:%S%z"))
            write_json(meta_path, meta)
            return Path(run_dir)
        path = run_dir or new_run_dir(self.config.name)
        path.mkdir(parents=True, exist_ok=True)
        write_run_header(path, self.config, self.split.dataset.fingerprint, extra)
        return path

    def _generators(self) -> dict[str, np.random.Generator]:
        return {"order": self.order_rng, "batch": self.batch_rng}

    def _train_rows(self) -> list[np.ndarray]:
        """What one epoch trains on: a sequence per user, or (``window = "sliding"``) per history window."""
        max_len = getattr(self.model, "max_len", None)
        if self.config.training.window == "last" or max_len is None:
            return self.split.train_sequences
        return sliding_windows(self.split.train_sequences, int(max_len))

    def _negative_sampler(self) -> NegativeSampler | None:
        cfg = self.config.training
        if cfg.loss != "sampled_ce":
            return None
        n_items = self.split.dataset.n_items
        counts = None
        if cfg.negative_sampler == "popularity":
            counts = np.bincount(np.concatenate(self.split.train_sequences), minlength=n_items + 1)
        return NegativeSampler(n_items, cfg.negative_sampler, counts)

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not self.pin_memory:
            return {k: v.to(self.device) for k, v in batch.items()}
        return {k: v.pin_memory().to(self.device, non_blocking=True) for k, v in batch.items()}

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.config.training.precision != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(self.device).type, dtype=torch.bfloat16)

    def _train_users(self) -> np.ndarray:
        lengths = np.array([len(s) for s in self.train_rows])
        return np.flatnonzero(lengths >= 2)  # a sequence of one item has nothing to predict

    def _epoch(self, step: nn.Module, optimizer: torch.optim.Optimizer, users: np.ndarray) -> float:
        cfg = self.config.training
        world, rank = self.dist.world_size, self.dist.rank
        self.model.train()
        order = self.order_rng.permutation(users)
        train = self.train_rows
        losses = []
        for start in range(0, len(order), cfg.batch_size):
            batch_users = order[start:start + cfg.batch_size]
            if world > 1:
                if len(batch_users) < world:
                    continue  # every rank skips the same tiny tail batch, keeping the ranks in step
                batch_users = batch_users[rank::world]
            batch = self.model.training_batch([train[u] for u in batch_users], self.batch_rng)
            if self.sampler is not None:  # sampled softmax: one draw of negatives per batch, shared by its positions
                batch["sampled_ids"], batch["sampled_logq"] = self.sampler.draw(cfg.num_negatives, self.batch_rng)
                if not cfg.logq_correction:
                    batch["sampled_logq"] = torch.zeros_like(batch["sampled_logq"])
            batch = self._to_device(batch)
            with self._autocast():
                loss = step(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            optimizer.step()
            losses.append(float(loss.detach()))
        return float(np.mean(losses)) if losses else float("nan")

    def _restore(self, optimizer: torch.optim.Optimizer) -> TrainingState | None:
        path = self.run_dir / LAST_CHECKPOINT
        if not path.exists():
            return None  # killed before the first epoch ended: start over
        state = load_training_state(path)
        if state.config_hash != self.config.config_hash():
            raise CheckpointError(f"{path}: written for another configuration")
        if state.world_size != self.dist.world_size:
            raise CheckpointError(f"{path}: written by {state.world_size} process(es); resume it with as many "
                                  f"(this run has {self.dist.world_size})")
        self.model.load_state_dict(state.model)
        optimizer.load_state_dict(state.optimizer)
        state.random_states[self.dist.rank].restore(self._generators())
        return state

    def _save(self, path: Path, optimizer: torch.optim.Optimizer, epoch: int, finished: bool,
              stopping: EarlyStopping, history: list[dict[str, Any]]) -> None:
        randoms = self.dist.gather(RankRandomState.capture(self._generators()))
        if not self.is_main:
            return
        state = TrainingState(epoch, finished, stopping, history, self.config.config_hash(), self.dist.world_size,
                              randoms, self.model.state_dict(), optimizer.state_dict())
        save_training_state(path, state)

    def fit(self) -> TrainingOutcome:
        cfg = self.config.training
        metric = cfg.early_stopping_metric
        start_time = time.perf_counter()
        best_path = self.run_dir / BEST_CHECKPOINT
        history: list[dict[str, Any]] = []
        stopping = EarlyStopping()
        epochs_run = resumed_from = 0
        if self.model.trainable and cfg.max_epochs > 0:
            optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
            step = wrap_for_training(TrainingLoss(self.model, cfg.loss), self.dist)
            users = self._train_users()
            finished = False
            best_state: dict[str, torch.Tensor] | None = None
            state = self._restore(optimizer) if self.resume else None
            if state is not None:
                history, stopping, finished = state.history, state.stopping, state.finished
                epochs_run = resumed_from = state.epoch
                if stopping.best_epoch:
                    # If the kill fell between writing a new best and the checkpoint of that epoch, this file is
                    # one epoch ahead; replaying that epoch (deterministically) writes the same weights again.
                    best_state = load_file(str(best_path))
            if self.is_main:  # the log holds exactly the epochs the checkpoint knows about
                tmp = self.run_dir / "metrics.jsonl.tmp"
                tmp.write_text("".join(json.dumps(r) + "\n" for r in history), encoding="utf-8")
                tmp.replace(self.run_dir / "metrics.jsonl")
            progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TextColumn("{task.fields[status]}"), console=console,
                                disable=self.quiet, transient=False)
            log_file = (self.run_dir / "metrics.jsonl").open("a", encoding="utf-8") if self.is_main else None
            with progress, log_file or contextlib.nullcontext():
                task = progress.add_task(f"train {self.config.model.name}", total=cfg.max_epochs,
                                         completed=epochs_run, status="")
                for epoch in range(epochs_run + 1, cfg.max_epochs + 1):
                    if finished:
                        break
                    t0 = time.perf_counter()
                    loss = self._epoch(step, optimizer, users)
                    record: dict[str, Any] = {"epoch": epoch, "loss": loss, "train_seconds": time.perf_counter() - t0}
                    if epoch % cfg.eval_every == 0 or epoch == cfg.max_epochs:
                        valid = self.evaluators.sampled.evaluate(self.model, "valid").summary()
                        record["valid"] = valid
                        value = valid[metric]
                        if value > stopping.best_value:
                            stopping = EarlyStopping(value, epoch, 0)
                            best_state = _state_dict_copy(self.model)
                            if self.is_main:
                                tmp_best = best_path.with_name(best_path.name + ".tmp")
                                save_file(best_state, str(tmp_best))
                                tmp_best.replace(best_path)
                        else:
                            stopping.stale += cfg.eval_every
                    history.append(record)
                    epochs_run = epoch
                    finished = stopping.stale >= cfg.patience or epoch == cfg.max_epochs
                    # Checkpoint before logging: a kill in between loses a log line that resuming rewrites.
                    self._save(self.run_dir / LAST_CHECKPOINT, optimizer, epoch, finished, stopping, history)
                    if log_file is not None:
                        log_file.write(json.dumps(record) + "\n")
                        log_file.flush()
                    progress.update(task, advance=1, status=f"loss {loss:.4f}  valid {metric} "
                                    f"{record.get('valid', {}).get(metric, float('nan')):.4f}  best "
                                    f"{stopping.best_value:.4f} @{stopping.best_epoch}")
                    if self.epoch_callback is not None:
                        self.epoch_callback(epoch, record)
            if best_state is None:
                raise RuntimeError("training ended without a validated checkpoint")
            self.model.load_state_dict(best_state)
        elif self.is_main:
            save_file({k: v.contiguous() for k, v in self.model.state_dict().items()}, str(best_path))
        final = self.evaluators.final(self.model)
        seconds = time.perf_counter() - start_time
        if self.is_main and self.evaluators.full is not None and len(self.evaluators.full.users) < len(
                self.split.eval_users):  # the sample itself, so that anyone can re-score the same users
            write_json(self.run_dir / "full_ranking_users.json",
                       {**self.evaluators.full.record(), "user_ids": self.evaluators.full.users.tolist()})
        if self.is_main:
            write_json(self.run_dir / "final.json", {"best_epoch": stopping.best_epoch,
                                                     "best_valid": stopping.best_value, "epochs_run": epochs_run,
                                                     "train_seconds": seconds, "resumed_from_epoch": resumed_from,
                                                     "world_size": self.dist.world_size, "metrics": final,
                                                     **self.evaluators.record()})
        self.dist.close()
        return TrainingOutcome(self.run_dir, stopping.best_epoch, stopping.best_value, final, epochs_run, seconds,
                               history, resumed_from)


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
    model.load_state_dict(load_file(str(Path(run_dir) / BEST_CHECKPOINT)))
    return Evaluators.from_config(config, split).final(model)
