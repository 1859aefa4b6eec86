"""``prismrec tune``: check the space, open (or continue) the study, start the worker processes, follow the
trials as they finish, and write the report.

Workers are separate processes (``python -m prismrec.experiments.tuning.worker``, the job on standard input),
each training one trial at a time; the coordinator only reads the storage. Killing a worker, or the whole
``tune``, loses at most the trials that were running: run the same command again and it continues.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from prismrec.data.paths import output_dir, prismrec_home
from prismrec.experiments.tuning.report import write_report
from prismrec.experiments.tuning.space import TuneSpace, load_space
from prismrec.experiments.tuning.study import (
    DEFAULT_HEARTBEAT,
    Counts,
    WorkerJob,
    count_trials,
    create_or_check_study,
    default_storage,
    display_url,
    open_storage,
)


@dataclass
class TuneResult:
    study: str
    storage: str
    space: TuneSpace
    counts: Counts
    report: dict[str, Any]
    worker_codes: list[int] = field(default_factory=list)
    finished_now: list[int] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.counts.finished >= (self.space.trials or 0)


def worker_command() -> list[str]:
    return [sys.executable, "-m", "prismrec.experiments.tuning.worker"]


def start_worker(job: WorkerJob) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PRISMREC_HOME": str(prismrec_home())}
    proc = subprocess.Popen(worker_command(), stdin=subprocess.PIPE, env=env)
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(asdict(job)).encode())
    proc.stdin.close()
    return proc


def _trial_line(trial: Any, space: TuneSpace) -> str:
    params = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items())
    state = trial.state.name
    if state == "COMPLETE":
        what = f"{space.study.metric} {trial.value:.4f}"
    elif state == "PRUNED":
        steps = sorted(trial.intermediate_values)
        what = f"after epoch {steps[-1]}" if steps else ""
    else:
        what = trial.user_attrs.get("error") or "killed"
    return f"trial {trial.number:>3} {state.lower():<8} {what}  {params}"


def tune(config: Path | None, space_path: Path, overrides: list[str] | None = None, study: str | None = None,
         storage: str | None = None, trials: int | None = None, workers: int = 1, heartbeat: int = DEFAULT_HEARTBEAT,
         out_dir: Path | None = None, command: str = "", quiet: bool = False,
         console: Console | None = None) -> TuneResult:
    """Run (or continue) a study until it has its trials, then write its report under ``out_dir``
    (default ``$PRISMREC_HOME/reports/tuning``)."""
    from prismrec.training.trainer import Evaluators, prepare_split

    console = console or Console()
    if workers < 1:
        raise ValueError("--workers must be at least 1")
    overrides = list(overrides or [])
    space = load_space(space_path, config, overrides, trials)
    name = study or space.path.stem
    target = int(space.trials or 0)
    base = space.base()
    split = prepare_split(base)  # a missing dataset stops here, before any worker starts
    Evaluators.from_config(base, split)  # writes the shared negatives cache once, before workers race for it
    url = storage or default_storage(name)
    shown = display_url(url)
    opened = open_storage(url, heartbeat)
    optuna_study = create_or_check_study(opened, name, space, split.dataset.fingerprint)
    counts = count_trials(optuna_study)
    seen = {t.number for t in optuna_study.get_trials(deepcopy=False) if t.state.is_finished()}
    codes: list[int] = []
    finished_now: list[int] = []
    if counts.finished >= target:
        console.print(f"study {name!r} ({shown}) has its {target} finished trials: nothing to run")
    else:
        threads = max(1, (os.cpu_count() or 1) // workers)
        wanted = min(workers, target - counts.finished)
        console.print(f"study {name!r} ({shown}): {counts.finished} of {target} trials finished; "
                      f"starting {wanted} worker(s); runs in {output_dir('runs') / f'tune-{name}'}")
        jobs = [WorkerJob(str(config) if config is not None else None, str(space_path), overrides, name, url, target,
                          heartbeat, index, threads) for index in range(wanted)]
        procs = [start_worker(job) for job in jobs]
        progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TextColumn("{task.fields[status]}"), console=console, disable=quiet)
        try:
            with progress:
                task = progress.add_task(f"tune {name}", total=target, completed=counts.finished, status="")
                while True:
                    alive = [p for p in procs if p.poll() is None]
                    trials_now = optuna_study.get_trials(deepcopy=False)
                    for trial in trials_now:
                        if trial.state.is_finished() and trial.number not in seen:
                            seen.add(trial.number)
                            finished_now.append(trial.number)
                            console.print(_trial_line(trial, space))
                    counts = count_trials(optuna_study)
                    running = [t for t in trials_now if t.state.name == "RUNNING"]
                    best = max((t.value for t in trials_now if t.state.name == "COMPLETE"), default=None)
                    status = (f"best {best:.4f}  " if best is not None else "") + "  ".join(
                        f"#{t.number}@{max(t.intermediate_values)}" if t.intermediate_values else f"#{t.number}"
                        for t in running)
                    progress.update(task, completed=min(counts.finished, target), status=status)
                    if not alive:
                        break
                    time.sleep(1.0)
        except KeyboardInterrupt:
            for proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGINT)
            for proc in procs:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
            raise
        codes = [p.wait() for p in procs]
        for job, code in zip(jobs, codes, strict=True):
            if code != 0:
                console.print(f"[yellow]worker {job.index} exited with code {code}[/yellow]")
        counts = count_trials(optuna_study)
    out = out_dir or output_dir("reports") / "tuning"
    report = write_report(optuna_study, space, out, command or f"prismrec tune {config} --space {space_path}",
                          shown, asdict(counts))
    return TuneResult(name, shown, space, counts, report, codes, finished_now)
