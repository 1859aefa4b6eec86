"""One trial of ``prismrec tune``: the parameters Optuna suggests, one normal run directory per seed, the mean
validation metric of the best checkpoints as the value, and pruning from the first seed's validation curve.

Only validation metrics are read (``valid/sampled`` or ``valid/full`` of ``final.json``, and the per-epoch
``valid`` record); the test split never reaches the study.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from prismrec.data.split import LeaveOneOutSplit
from prismrec.experiments.tuning.space import TuneSpace
from prismrec.training import Trainer

if TYPE_CHECKING:
    import optuna

# Trial attributes (user attrs) the objective writes and the study runner and report read.
ERROR_ATTR = "error"  # a trial that failed by an exception (counted as finished: nothing permanent is retried)
RETRY_ATTR = "retry_of"  # a trial queued again because the process running it was killed
MAX_ATTEMPTS = 2  # a killed trial is run once more; killed again, it is left failed (e.g. the OOM killer)


def trial_dir(runs_root: Path, number: int, seed: int) -> Path:
    return runs_root / f"trial-{number:04d}-seed{seed}"


class EpochReporter:
    """The Trainer's ``epoch_callback`` for a trial: reports the validation metric of each evaluated epoch and
    raises :class:`optuna.TrialPruned` when the pruner says so."""

    def __init__(self, trial: optuna.Trial, metric: str, full_mode: bool) -> None:
        self.trial = trial
        self.metric = metric
        self.full_mode = full_mode
        self.trainer: Trainer | None = None

    def __call__(self, epoch: int, record: dict[str, Any]) -> None:
        import optuna

        if "valid" not in record:
            return
        value = float(record["valid"][self.metric])
        if self.full_mode:  # the Trainer validates in sampled mode each epoch; the full-ranking curve is ours
            assert self.trainer is not None and self.trainer.evaluators.full is not None
            value = self.trainer.evaluators.full.evaluate(self.trainer.model, "valid").summary()[self.metric]
        self.trial.report(value, epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {epoch} (valid {self.metric} {value:.4f})")


class Objective:
    """``objective(trial) -> mean validation metric over the space's seeds``, each seed a run directory
    ``runs_root/trial-NNNN-seedS`` (created once: a trial number is never run twice)."""

    def __init__(self, space: TuneSpace, study_name: str, runs_root: Path, split: LeaveOneOutSplit,
                 on_start: Callable[[], None] | None = None) -> None:
        self.space = space
        self.study_name = study_name
        self.runs_root = runs_root
        self.split = split
        self.on_start = on_start
        self.last_number: int | None = None

    def __call__(self, trial: optuna.Trial) -> float:
        self.last_number = trial.number
        if self.on_start is not None:  # the trial exists in the storage now: another worker may ask for one
            self.on_start()
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        try:
            params = {key: spec.suggest(trial, key) for key, spec in self.space.params.items()}
            return self._run(trial, params)
        except KeyboardInterrupt:
            frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
            requeue(trial.study, frozen.number, frozen.params, frozen.system_attrs, frozen.user_attrs)
            raise
        except Exception as exc:
            import optuna

            if not isinstance(exc, optuna.TrialPruned):
                trial.set_user_attr(ERROR_ATTR, f"{type(exc).__name__}: {exc}")
            raise

    def _run(self, trial: optuna.Trial, params: dict[str, Any]) -> float:
        study = self.space.study
        values: list[float] = []
        run_dirs: list[str] = []
        epochs: list[int] = []
        for index, seed in enumerate(self.space.seeds):
            run_dir = trial_dir(self.runs_root, trial.number, seed)
            if (run_dir / "meta.json").exists():
                raise RuntimeError(f"{run_dir} already holds a run: another study of the name "
                                   f"{self.study_name!r} (another storage?) wrote to the same runs folder")
            config = self.space.config_for(params, seed, name=f"{self.study_name}-trial{trial.number:04d}-seed{seed}")
            reporter = EpochReporter(trial, study.metric, study.mode == "full") if index == 0 else None
            run_dirs.append(str(run_dir))
            trial.set_user_attr("run_dirs", run_dirs)
            trainer = Trainer(config, split=self.split, run_dir=run_dir, quiet=True, epoch_callback=reporter)
            if reporter is not None:
                reporter.trainer = trainer
            outcome = trainer.fit()
            values.append(float(outcome.final[f"valid/{study.mode}"][study.metric]))
            epochs.append(outcome.epochs_run)
            trial.set_user_attr("seed_values", values)
            trial.set_user_attr("epochs", epochs)
            trial.set_user_attr("best_epochs", [*trial.user_attrs.get("best_epochs", []), outcome.best_epoch])
        return float(np.mean(values))


def requeue(study: optuna.Study, number: int, params: dict[str, Any], system_attrs: dict[str, Any],
            user_attrs: dict[str, Any]) -> bool:
    """Queue the parameters of a killed or interrupted trial once more, as a new trial (its own number and run
    directories). Grid points keep their grid id, so the grid is completed rather than a point repeated."""
    import optuna

    attempt = int(user_attrs.get("attempt", 1))
    if attempt >= MAX_ATTEMPTS or not (params or "grid_id" in system_attrs):
        return False  # killed again, or killed before it drew parameters (the sampler draws new ones anyway)
    system = {"fixed_params": dict(params)}
    for key in ("grid_id", "search_space"):
        if key in system_attrs:
            system[key] = system_attrs[key]
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.WAITING, system_attrs=system,
                                              user_attrs={RETRY_ATTR: number, "attempt": attempt + 1}))
    return True


def requeue_stale(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """The storage's heartbeat callback: called once (by the process that marked it failed) per trial whose
    worker stopped beating."""
    requeue(study, trial.number, trial.params, trial.system_attrs, trial.user_attrs)
