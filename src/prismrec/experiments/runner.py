"""Run an experiment grid: every cell a normal run directory, finished cells reused.

Cells live in ``$PRISMREC_HOME/runs/experiments/<cell id>-<config hash>`` (shared by experiments: the
DMESR cells of Table 2 are those of Table 3 and of the long-tail figure). A cell whose directory holds
``final.json`` and ``per_user.safetensors`` written for the same resolved config hash and data fingerprint
is reused as is; one killed mid-training resumes from its ``last.safetensors``. So an interrupted or
extended grid continues where it stopped. ``cell.json`` records the cell's coordinates and wall time.

*Cell records* (``records=DIR``, ``prismrec reproduce --records DIR``) make finished cells outlive the
machine: each finished cell's small result files (resolved config, meta, final metrics, cell.json and the
per-user test metrics the report reads, no weights) are copied to ``DIR/<cell id>-<config hash>/``, and a
cell whose record matches the config hash and data fingerprint is reused from there. A grid spread over
several sittings on fresh machines (run directories gone) keeps every finished cell this way, a few tens of
kilobytes each, small enough to commit next to the report.

A cell is also reused from a finished cell *of another name* whose settings are equal (the resolved config
without its ``name``; :meth:`~prismrec.config.RunConfig.settings_hash`) on the same data: Table 2's DMESR,
the alpha sweep's alpha = 0.1, the d sweep's d = 128 and the ``mllm`` grid's describe column are one
training each. The report's cell list then names the directory the result came from.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file

from prismrec.config import RunConfig
from prismrec.data.paths import output_dir
from prismrec.data.split import LeaveOneOutSplit
from prismrec.experiments.spec import Cell, ExperimentSpec
from prismrec.options import ConfigError
from prismrec.semantics.artefact import ArtefactError, artefact_ready, artefacts_named, derive_command
from prismrec.training.runs import load_run_config, write_json
from prismrec.training.trainer import (
    BEST_CHECKPOINT,
    LAST_CHECKPOINT,
    Evaluators,
    Trainer,
    build_model,
    prepare_split,
    seed_everything,
)

console = Console()
PER_USER_FILE = "per_user.safetensors"
CELL_FILE = "cell.json"
LOCK_FILE = ".lock"
LONGTAIL_SHARE = 0.8  # paper Figure 2: targets among the last 80% of items by training popularity


@dataclass
class CellResult:
    cell: Cell
    run_dir: Path
    final: dict[str, Any]
    wall_seconds: float
    reused: bool

    def per_user(self) -> dict[str, np.ndarray]:
        return load_numpy(str(self.run_dir / PER_USER_FILE))


def runs_root_default() -> Path:
    return output_dir("runs") / "experiments"


def cell_dir(root: Path, cell: Cell) -> Path:
    return root / f"{cell.cell_id}-{cell.config.config_hash()}"


def longtail_items(split: LeaveOneOutSplit, share: float = LONGTAIL_SHARE) -> np.ndarray:
    """Boolean mask over item ids (index 0 = padding): the ``share`` least popular items in training."""
    n_items = split.dataset.n_items
    counts = np.zeros(n_items + 1, dtype=np.int64)
    for seq in split.train_sequences:
        np.add.at(counts, np.asarray(seq, dtype=np.int64), 1)
    order = np.argsort(-counts[1:], kind="stable") + 1  # most popular first, ties by id
    head = round(n_items * (1.0 - share))
    mask = np.ones(n_items + 1, dtype=bool)
    mask[0] = False
    mask[order[:head]] = False
    return mask


def save_per_user(run_dir: Path, model: torch.nn.Module, evaluators: Evaluators, split: LeaveOneOutSplit) -> None:
    """Per-user test metrics of both modes (the paired t-tests and long-tail figures read these)."""
    arrays: dict[str, np.ndarray] = {}
    tail = longtail_items(split)
    for evaluator in (evaluators.sampled, evaluators.full):
        if evaluator is None:
            continue
        result = evaluator.evaluate(model, "test")  # type: ignore[arg-type]
        prefix = f"test/{evaluator.mode}"
        arrays[f"{prefix}/users"] = result.users.astype(np.int64)
        for name, values in result.per_user.items():
            arrays[f"{prefix}/{name}"] = np.asarray(values, dtype=np.float64)
        targets = np.array([split.inputs_and_target(int(u), "test")[1] for u in result.users], dtype=np.int64)
        arrays[f"{prefix}/longtail"] = tail[targets].astype(np.uint8)
    tmp = run_dir / (PER_USER_FILE + ".tmp")
    save_numpy(arrays, str(tmp))
    tmp.replace(run_dir / PER_USER_FILE)


RECORD_FILES = ("config.toml", "meta.json", "final.json", CELL_FILE)


def write_record(run_dir: Path, record_dir: Path, metrics: Sequence[str]) -> None:
    """Copy a finished cell's result files to ``record_dir``, per-user arrays cut to the report's metrics."""
    tmp = record_dir.with_name(record_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in RECORD_FILES:
        if (run_dir / name).exists():
            shutil.copy2(run_dir / name, tmp / name)
    arrays = load_numpy(str(run_dir / PER_USER_FILE))
    keep = {k: v for k, v in arrays.items() if k.rsplit("/", 1)[1] in {"users", "longtail", *metrics}}
    save_numpy(keep, str(tmp / PER_USER_FILE))
    shutil.rmtree(record_dir, ignore_errors=True)
    tmp.replace(record_dir)


def rescore(run_dir: Path, config: RunConfig, split: LeaveOneOutSplit) -> None:
    """Per-user metrics of a finished run from its best checkpoint (for runs trained outside the runner)."""
    seed_everything(config.seed)
    model = build_model(config, split)
    model.load_state_dict(load_file(str(run_dir / BEST_CHECKPOINT)))
    save_per_user(run_dir, model, Evaluators.from_config(config, split), split)


def _finished(run_dir: Path, config: RunConfig, fingerprint: str) -> bool:
    meta_path, final_path = run_dir / "meta.json", run_dir / "final.json"
    if not (meta_path.exists() and final_path.exists()):
        return False
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    return meta.get("config_hash") == config.config_hash() and meta.get("data_fingerprint") == fingerprint


class CellBusyError(RuntimeError):
    """Another process is training this cell now (two invocations whose grids overlap)."""


class NotFinishedError(RuntimeError):
    """``finished_only``: a cell would have to train (its files are on disk but for other data)."""


@contextlib.contextmanager
def cell_lock(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on a cell's run directory while it trains.

    Two ``reproduce`` invocations whose grids overlap (say, one per seed and one over every seed) would
    otherwise both train the same cell into one directory: the second resumes from the first's checkpoint and
    replaces its log under it. The lock is advisory (``flock``), released when the process dies, so a killed
    run never leaves a stale lock; where ``fcntl`` is missing (Windows) there is no lock.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on the platforms CI runs
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    with path.open("a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise CellBusyError(f"cell {run_dir.name} is being trained by {holder} (lock {path}); run the "
                                "overlapping invocations one after the other, or give them disjoint "
                                "--seeds/--methods/--backbones") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class ExperimentRunner:
    """Executes the cells of one experiment in order, reusing what is already done."""

    def __init__(self, spec: ExperimentSpec, cells: Sequence[Cell], runs_root: Path | None = None,
                 quiet: bool = False, records: Path | None = None, finished_only: bool = False) -> None:
        self.spec = spec
        self.cells = list(cells)
        self.root = runs_root or runs_root_default()
        self.quiet = quiet
        self.records = records
        self._splits: dict[str, LeaveOneOutSplit] = {}
        self.trained: list[str] = []  # cell ids trained (not reused) by this runner
        # finished_only: reuse what is finished, train nothing; the cells skipped are listed in ``missing``
        # (a report of a long grid part-way through, say while other processes still train the rest).
        self.finished_only = finished_only
        self.missing: list[Cell] = []
        self._settings_index: dict[str, list[tuple[str, Path]]] | None = None

    def split_for(self, config: RunConfig) -> LeaveOneOutSplit:
        key = json.dumps(config.data.model_dump(mode="json"), sort_keys=True)
        if key not in self._splits:
            self._splits[key] = prepare_split(config)
        return self._splits[key]

    def run_cell(self, cell: Cell) -> CellResult:
        split = self.split_for(cell.config)
        run_dir = cell_dir(self.root, cell)
        fingerprint = split.dataset.fingerprint
        cell_path = run_dir / CELL_FILE
        record = self.record_dir(cell)
        if _finished(run_dir, cell.config, fingerprint):
            if not (run_dir / PER_USER_FILE).exists():
                rescore(run_dir, cell.config, split)
            if record is not None and not _finished(record, cell.config, fingerprint):
                write_record(run_dir, record, self.spec.metrics)
            return self._reused(cell, run_dir)
        if record is not None and _finished(record, cell.config, fingerprint) and (record / PER_USER_FILE).exists():
            return self._reused(cell, record)
        equivalent = self.equivalent(cell, fingerprint)
        if equivalent is not None:
            if self.records is not None and equivalent.parent != self.records \
                    and not (self.records / equivalent.name / PER_USER_FILE).exists():
                write_record(equivalent, self.records / equivalent.name, self.spec.metrics)
            return self._reused(cell, equivalent)
        if self.finished_only:
            raise NotFinishedError(f"cell {cell.cell_id}: {run_dir} holds results for another config or other "
                                   f"data (fingerprint now {fingerprint}); rerun without --finished-only to "
                                   "retrain it")
        with cell_lock(run_dir):
            if _finished(run_dir, cell.config, fingerprint):  # finished by another process since the check above
                return self.run_cell(cell)
            resume = (run_dir / "meta.json").exists() and (run_dir / LAST_CHECKPOINT).exists()
            start = time.perf_counter()
            trainer = Trainer(cell.config, split=split, run_dir=run_dir, quiet=True, resume=resume)
            trainer.fit()
            save_per_user(run_dir, trainer.model, trainer.evaluators, split)
            wall = time.perf_counter() - start
            previous = json.loads(cell_path.read_text()) if cell_path.exists() else {}
            write_json(cell_path, {"experiment": self.spec.name, "method": cell.method, "backbone": cell.backbone,
                                   "seed": cell.seed, "axes": dict(cell.axis_values), "setting": cell.setting,
                                   "config_hash": cell.config.config_hash(), "data_fingerprint": fingerprint,
                                   "wall_seconds": wall + float(previous.get("wall_seconds", 0.0)),
                                   "resumed": resume})
        self.trained.append(cell.cell_id)
        # A later cell of this grid with equal settings (another name) reuses this one.
        self._finished_by_settings().setdefault(cell.config.settings_hash(), []).append((fingerprint, run_dir))
        if record is not None:
            write_record(run_dir, record, self.spec.metrics)
        final = json.loads((run_dir / "final.json").read_text(encoding="utf-8"))
        return CellResult(cell, run_dir, final, float(json.loads(cell_path.read_text())["wall_seconds"]), False)

    @staticmethod
    def _reused(cell: Cell, folder: Path) -> CellResult:
        cell_path = folder / CELL_FILE
        wall = json.loads(cell_path.read_text())["wall_seconds"] if cell_path.exists() else float("nan")
        final = json.loads((folder / "final.json").read_text(encoding="utf-8"))
        return CellResult(cell, folder, final, wall, reused=True)

    def record_dir(self, cell: Cell) -> Path | None:
        """Where the cell's record lives (named like its run directory); None without a records folder."""
        return None if self.records is None else self.records / cell_dir(self.root, cell).name

    def is_done(self, cell: Cell) -> bool:
        """Finished on disk (run directory, record or an equal-settings cell of another name); checked by file
        presence and settings only, not the data fingerprint (the ETA and --dry-run)."""
        folders = [cell_dir(self.root, cell), self.record_dir(cell)]
        return any(f is not None and (f / "final.json").exists() and (f / PER_USER_FILE).exists() for f in folders) \
            or bool(self._finished_by_settings().get(cell.config.settings_hash()))

    def equivalent(self, cell: Cell, fingerprint: str) -> Path | None:
        """A finished cell of another name with this cell's settings, on data with this fingerprint, whose
        per-user file has this report's metrics (a record keeps only its own report's)."""
        wanted = {f"test/{mode}/{metric}" for mode in ("sampled", "full") for metric in self.spec.metrics}
        for data, folder in self._finished_by_settings().get(cell.config.settings_hash(), []):
            if data == fingerprint and wanted <= set(load_numpy(str(folder / PER_USER_FILE))):
                return folder
        return None

    def _finished_by_settings(self) -> dict[str, list[tuple[str, Path]]]:
        """settings hash -> (data fingerprint, folder) of every finished cell in the records and the runs root.

        Built once per runner from what is on disk (records first); cells this runner trains are added as they
        finish.
        """
        if self._settings_index is None:
            self._settings_index = {}
            for root in [r for r in (self.records, self.root) if r is not None and r.is_dir()]:
                for folder in sorted(root.iterdir()):
                    if not all((folder / f).exists() for f in ("config.toml", "meta.json", "final.json",
                                                               PER_USER_FILE)):
                        continue
                    try:
                        config = load_run_config(folder)
                        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
                    except (ConfigError, ValueError, OSError):
                        continue  # a folder of an older schema or a broken one is not evidence of anything
                    if meta.get("config_hash") != config.config_hash():
                        continue  # config.toml and the results disagree
                    self._settings_index.setdefault(config.settings_hash(), []).append(
                        (str(meta.get("data_fingerprint")), folder))
        return self._settings_index

    def missing_artefacts(self) -> dict[str, list[str]]:
        """Semantics artefacts that cells still to train name but that are not on disk: name -> cell ids."""
        missing: dict[str, list[str]] = {}
        for cell in self.cells:
            if self.is_done(cell):
                continue
            for name in artefacts_named(cell.config.model):
                if not artefact_ready(name):
                    missing.setdefault(name, []).append(cell.cell_id)
        return missing

    def check_artefacts(self) -> None:
        """Raise, naming each missing artefact, its cells and the command that derives it, before anything trains
        (a grid would otherwise spend hours on its first methods and then stop at the one without semantics)."""
        missing = self.missing_artefacts()
        if not missing:
            return
        lines = [f"  {name}: {derive_command(name)}  (needed by {', '.join(cells[:3])}"
                 + (f" and {len(cells) - 3} more cell(s))" if len(cells) > 3 else ")")
                 for name, cells in missing.items()]
        raise ArtefactError(f"{len(missing)} semantics artefact(s) this grid needs are missing, so nothing was "
                            "trained; derive them first (or leave their methods out with --methods):\n"
                            + "\n".join(lines))

    def run(self, on_result: Callable[[CellResult], None] | None = None) -> list[CellResult]:
        results: list[CellResult] = []
        if not self.finished_only:
            self.check_artefacts()
        # Cells that look finished on disk are reused in seconds: the ETA counts only the others.
        pending = [not self.is_done(c) for c in self.cells]
        # finished_only: the pending cells are left out, not trained (the ETA then stays "?": nothing trains).
        self.missing = [c for c, todo in zip(self.cells, pending, strict=True) if todo] if self.finished_only else []
        trained_seconds: list[float] = []
        progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TextColumn("{task.fields[status]}"), console=console,
                            disable=self.quiet)
        total = len(self.cells)
        with progress:
            task = progress.add_task(f"{self.spec.name}", total=total, status="")
            for index, cell in enumerate(self.cells):
                left = total - index - 1
                if self.finished_only and pending[index]:
                    progress.update(task, advance=1)
                    continue
                eta = _eta(trained_seconds, sum(pending[index:]))
                progress.update(task, status=f"done {index}  running 1 ({cell.cell_id})  left {left}  ETA {eta}")
                result = self.run_cell(cell)
                if not result.reused:
                    trained_seconds.append(result.wall_seconds)
                results.append(result)
                if on_result is not None:
                    on_result(result)
                progress.update(task, advance=1)
            progress.update(task, status=f"done {total}  running 0  left 0  ({len(self.trained)} trained, "
                                         f"{len(results) - len(self.trained)} reused, "
                                         f"{len(self.missing)} not finished)")
        return results


def _eta(trained_seconds: list[float], cells_to_train: int) -> str:
    if not trained_seconds:
        return "?"
    seconds = float(np.mean(trained_seconds)) * cells_to_train
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"
