"""Studies and their workers: the storage, how many trials are left, and the loop each worker process runs.

Storage: an Optuna ``RDBStorage`` (any SQLAlchemy URL; by default the SQLite file
``$PRISMREC_HOME/tuning/NAME.db``) with heartbeats: every running trial's worker records a heartbeat every
``heartbeat`` seconds, and a trial whose worker stopped beating for ``3 x heartbeat`` seconds (a worker or a
``tune`` killed with SIGKILL, a machine lost) is marked ``FAIL`` by the next worker that looks, and its
parameters are queued once more as a new trial (:func:`~.objective.requeue`). A trial number is run by one
process, once.

A study aims at ``trials`` *finished* trials: complete, pruned, or failed by an exception in the run (a
permanent failure, never retried). A worker starts a trial only while finished + running trials are fewer; when
the rest are running elsewhere it waits for them (or for their heartbeats to stop), so ``tune`` returns when the
study is finished and a finished study runs nothing. Workers on one machine take a lock file around "count,
then create the trial", so they never overshoot; workers on several machines sharing a database can overshoot
by at most one trial per extra machine.
"""

from __future__ import annotations

import contextlib
import fcntl
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prismrec.data.paths import output_dir
from prismrec.experiments.tuning.objective import ERROR_ATTR, Objective, requeue_stale
from prismrec.experiments.tuning.space import TuneSpace
from prismrec.options import ConfigError

if TYPE_CHECKING:
    import optuna

STUDY_ATTR = "prismrec"  # study user attr: what the study's trials share (see TuneSpace.fingerprint)
DEFAULT_HEARTBEAT = 10


def default_storage(study: str) -> str:
    return f"sqlite:///{output_dir('tuning') / f'{study}.db'}"


def display_url(url: str) -> str:
    """The storage URL with any password masked, for reports and logs."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy parses: say nothing of it
        return "(unparsed storage URL)"


def open_storage(url: str, heartbeat: int = DEFAULT_HEARTBEAT) -> optuna.storages.RDBStorage:
    import optuna

    quiet_optuna()
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        engine_kwargs = {"connect_args": {"timeout": 60}}  # several processes write one file: wait for the lock
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat,
                                          grace_period=3 * heartbeat, heartbeat_stale_trial_callback=requeue_stale)
    except (ImportError, ModuleNotFoundError) as exc:
        raise ConfigError(f"storage {display_url(url)}: its database driver is not installed ({exc}); "
                          f"e.g. pip install psycopg2-binary for PostgreSQL, PyMySQL for MySQL") from None
    except Exception as exc:  # sqlalchemy's ArgumentError, OperationalError, ...: name the storage
        raise ConfigError(f"storage {display_url(url)}: {type(exc).__name__}: {exc}") from None


def quiet_optuna() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


@dataclass
class Counts:
    complete: int = 0
    pruned: int = 0
    errors: int = 0  # failed by an exception in the run: finished, not retried
    killed: int = 0  # failed because its worker died (requeued once)
    running: int = 0
    waiting: int = 0

    @property
    def finished(self) -> int:
        return self.complete + self.pruned + self.errors


def count_trials(study: optuna.Study) -> Counts:
    from optuna.trial import TrialState

    counts = Counts()
    for trial in study.get_trials(deepcopy=False):
        if trial.state == TrialState.COMPLETE:
            counts.complete += 1
        elif trial.state == TrialState.PRUNED:
            counts.pruned += 1
        elif trial.state == TrialState.FAIL:
            if ERROR_ATTR in trial.user_attrs:
                counts.errors += 1
            else:
                counts.killed += 1
        elif trial.state == TrialState.RUNNING:
            counts.running += 1
        elif trial.state == TrialState.WAITING:
            counts.waiting += 1
    return counts


def fail_orphans(study: optuna.Study, grace: float) -> list[int]:
    """Mark failed (and requeue) the running trials whose objective never started ``2 x grace`` seconds after
    the trial was created: a worker killed between creating a trial and its first heartbeat leaves one that the
    heartbeat check never sees (it has no heartbeat to go stale). A live trial records its ``pid`` at once."""
    import datetime

    import optuna
    from optuna.trial import TrialState

    now = datetime.datetime.now()
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        started = trial.datetime_start
        if "pid" in trial.user_attrs or started is None or (now - started).total_seconds() < 2 * grace:
            continue
        try:
            if not study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker got there first
        requeue_stale(study, trial)
        failed.append(trial.number)
    return failed


def create_or_check_study(storage: optuna.storages.BaseStorage, name: str, space: TuneSpace,
                          data_fingerprint: str | None = None) -> optuna.Study:
    """The study ``name`` (created when new); one created from another config, space or data is refused, so a
    study never mixes trials of different objectives."""
    import optuna

    study = optuna.create_study(study_name=name, storage=storage, direction="maximize", load_if_exists=True)
    wanted = {**space.fingerprint(), "data_fingerprint": data_fingerprint}
    recorded = study.user_attrs.get(STUDY_ATTR)
    if recorded is None:
        study.set_user_attr(STUDY_ATTR, {**wanted, "config": str(space.base_config), "space": str(space.path)})
    else:
        differs = [k for k, v in wanted.items() if v is not None and recorded.get(k) not in (None, v)]
        if differs:
            raise ConfigError(f"study {name!r} was created from another run config or space file ({', '.join(differs)} "
                              f"differ; it came from {recorded.get('config')} and {recorded.get('space')}): "
                              f"pass another --study name, or delete it from the storage to start over")
    return study


def load_study(storage: optuna.storages.BaseStorage, name: str, space: TuneSpace, seed: int) -> optuna.Study:
    """The study with this process's sampler and pruner (samplers and pruners live in processes, not storage)."""
    import optuna

    max_epochs = space.base().training.max_epochs
    return optuna.load_study(study_name=name, storage=storage, sampler=space.settings.sampler.build(space.params, seed),
                             pruner=space.settings.pruner.build(max_epochs))


class LocalLock:
    """An exclusive ``flock`` on a file, held from "count the trials" until the new trial exists."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._handle: Any = None

    def acquire(self) -> None:
        self._handle = self.path.open("a")
        fcntl.flock(self._handle, fcntl.LOCK_EX)

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None

    @contextlib.contextmanager
    def held(self) -> Iterator[LocalLock]:
        self.acquire()
        try:
            yield self
        finally:
            self.release()


@dataclass
class WorkerJob:
    """What one worker process needs (sent as JSON on its standard input: the URL may hold a password)."""

    config: str | None
    space: str
    overrides: list[str]
    study: str
    storage: str
    trials: int
    heartbeat: int = DEFAULT_HEARTBEAT
    index: int = 0
    threads: int | None = None

    def runs_root(self) -> Path:
        return output_dir("runs") / f"tune-{self.study}"

    def lock_path(self) -> Path:
        return output_dir("tuning") / f"{self.study}.lock"


@dataclass
class WorkerSummary:
    ran: list[int]
    errors: int


class WorkerError(RuntimeError):
    """A worker stopped because its trials kept failing (a permanent problem, not retried)."""


ERRORS_IN_A_ROW = 3


def run_worker(job: WorkerJob, poll_seconds: float | None = None) -> WorkerSummary:
    """Run trials of ``job.study`` until it has ``job.trials`` finished trials (see the module docstring)."""
    import optuna
    import torch

    from prismrec.training import prepare_split

    quiet_optuna()
    space = _space(job)
    if job.threads and space.base().training.num_threads is None:
        torch.set_num_threads(job.threads)
    storage = open_storage(job.storage, job.heartbeat)
    existing = len(optuna.load_study(study_name=job.study, storage=storage).get_trials(deepcopy=False))
    # Each worker (and each sitting) draws from its own stream: equal seeds would propose equal trials.
    study = load_study(storage, job.study, space, space.settings.sampler.seed + 1000 * existing + job.index)
    split = prepare_split(space.base())
    lock = LocalLock(job.lock_path())
    objective = Objective(space, job.study, job.runs_root(), split, on_start=lock.release)
    poll = poll_seconds or max(1.0, job.heartbeat / 2)
    ran: list[int] = []
    errors_in_a_row = errors = 0
    while True:
        with lock.held():
            optuna.storages.fail_stale_trials(study)
            fail_orphans(study, 3 * job.heartbeat)
            counts = count_trials(study)
            if counts.finished >= job.trials:
                break
            start = counts.finished + counts.running < job.trials
            if start:
                objective.last_number = None
                try:
                    study.optimize(objective, n_trials=1, catch=(Exception,))
                except optuna.exceptions.UpdateFinishedTrialError:
                    # marked failed while it ran: its heartbeats came too late (a loaded machine; raise --heartbeat)
                    pass
        if not start:
            time.sleep(poll)  # the remaining trials run elsewhere: wait for them, or for their heartbeats to stop
            continue
        if objective.last_number is None:
            continue
        ran.append(objective.last_number)
        trial = next(t for t in study.get_trials(deepcopy=False) if t.number == objective.last_number)
        if trial.state == optuna.trial.TrialState.FAIL and ERROR_ATTR in trial.user_attrs:
            errors += 1
            errors_in_a_row += 1
            if errors_in_a_row >= ERRORS_IN_A_ROW:
                raise WorkerError(f"{ERRORS_IN_A_ROW} trials in a row failed; the last (trial {trial.number}): "
                                  f"{trial.user_attrs[ERROR_ATTR]}")
        else:
            errors_in_a_row = 0
    return WorkerSummary(ran, errors)


def _space(job: WorkerJob) -> TuneSpace:
    from prismrec.experiments.tuning.space import load_space

    return load_space(job.space, job.config, job.overrides, job.trials)
