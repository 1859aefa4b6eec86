"""``prismrec tune`` for real: SQLite studies, worker processes, pruning, SIGKILL and resumption, the report and
the best config trained back, on a tiny MovieLens-format dataset with a learnable next-item pattern."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from typer.testing import CliRunner

from prismrec.cli.app import app
from prismrec.config import load_config
from prismrec.experiments.tuning.objective import RETRY_ATTR
from prismrec.experiments.tuning.space import load_space
from prismrec.experiments.tuning.study import (
    WorkerJob,
    create_or_check_study,
    display_url,
    fail_orphans,
    open_storage,
    run_worker,
)
from prismrec.options import ConfigError
from prismrec.training.runs import load_run_config

from conftest import write_movielens

REPO = Path(__file__).resolve().parents[1]
N_ITEMS = 39


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A data folder and a run config: 80 users walking the 39 items in order (item i is followed by i + 1), so
    a small SASRec learns it in a few epochs and a diverging one is plain to see."""
    root = tmp_path_factory.mktemp("tiny")
    rows = ["userId,movieId,rating,timestamp"]
    for user in range(1, 81):
        start = (user * 7) % N_ITEMS
        rows += [f"{user},{(start + t) % N_ITEMS + 1},4.0,{1000 + t}" for t in range(15)]
    write_movielens(root / "data", "\n".join(rows) + "\n")
    (root / "tiny.toml").write_text(textwrap.dedent(f"""\
        name = "tiny"
        seed = 42
        [data]
        dataset = "movielens-small"
        data_dir = "{root / 'data'}"
        [model]
        name = "sasrec"
        hidden_size = 16
        num_blocks = 1
        max_len = 10
        dropout = 0.1
        [training]
        lr = 0.01
        batch_size = 64
        max_epochs = 6
        num_threads = 1
        [evaluation]
        num_negatives = 10
        ks = [10]
        full_ranking = false
        """), encoding="utf-8")
    return root


def _space(tmp_path: Path, body: str, name: str = "space") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(textwrap.dedent(body), encoding="utf-8")
    return path


LR_SPACE = """
    [study]
    metric = "ndcg@10"
    trials = 4
    [sampler]
    kind = "random"
    [pruner]
    kind = "none"
    [params."training.lr"]
    type = "float"
    low = 0.003
    high = 0.03
    log = true
    [params."model.hidden_size"]
    type = "categorical"
    choices = [8, 16]
    """


def _env(home: Path) -> dict[str, str]:
    return {**os.environ, "PRISMREC_HOME": str(home)}


def _tune(config: Path, space: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "prismrec", "tune", str(config), "--space", str(space), "--quiet", *args]


def _trials(home: Path, study: str) -> list[optuna.trial.FrozenTrial]:
    storage = optuna.storages.RDBStorage(f"sqlite:///{home / 'tuning' / f'{study}.db'}")
    return optuna.load_study(study_name=study, storage=storage).get_trials()


def _run_dirs(home: Path, study: str) -> list[Path]:
    return sorted((home / "runs" / f"tune-{study}").glob("trial-*"))


def test_a_space_file_with_an_unknown_option_or_an_empty_range_is_an_error_naming_the_key(tiny, tmp_path):
    config = tiny / "tiny.toml"
    cases = {
        '[params."training.lrr"]\ntype = "float"\nlow = 0.001\nhigh = 0.01': ['params."training.lrr"',
                                                                            "unknown option"],
        '[params."model.hidden"]\ntype = "categorical"\nchoices = [8, 16]': ['params."model.hidden"', "unknown option"],
        '[params."training.lr"]\ntype = "float"\nlow = 0.01\nhigh = 0.001': ["training.lr", "empty range"],
        '[params."training.lr"]\ntype = "float"\nlow = 0.01\nhigh = 0.01': ["training.lr", "empty range"],
        '[params."model.hidden_size"]\ntype = "int"\nlow = 32\nhigh = 8': ["model.hidden_size", "empty range"],
        '[params."training.loss"]\ntype = "categorical"\nchoices = []': ["training.loss", "empty range"],
        '[params."training.lr"]\ntype = "float"\nlow = 0.001\nhigh = 0.01\nlwo = 3': ['params."training.lr"', "lwo"],
        '[params."model.dropout"]\ntype = "float"\nlow = 0.5\nhigh = 1.5': ['params."model.dropout"', "model.dropout"],
        '[params."training.loss"]\ntype = "categorical"\nchoices = ["bce", "focal"]': ["training.loss", "focal"],
        '[params."training.lr"]\ntype = "float"\nlow = 0.0\nhigh = 0.1\nlog = true': ["training.lr", "log-scale"],
        '[params."training.lr"]\ntype = "gaussian"': ['params."training.lr"', "type"],
        '[params."evaluation.num_negatives"]\ntype = "int"\nlow = 5\nhigh = 9': ["evaluation.num_negatives",
                                                                                 "cannot be tuned"],
        '[params.seed]\ntype = "int"\nlow = 1\nhigh = 9': ['params."seed"', "cannot be tuned"],
        '[study]\nmetric = "ndcg@50"\n[params."training.lr"]\ntype = "float"\nlow = 0.001\nhigh = 0.01':
            ["study.metric", "ndcg@10"],
        '[study]\nmode = "full"\n[params."training.lr"]\ntype = "float"\nlow = 0.001\nhigh = 0.01':
            ["study.mode", "full_ranking"],
        '[sampler]\nkind = "cmaes"\n[params."training.lr"]\ntype = "float"\nlow = 0.001\nhigh = 0.01':
            ["sampler", "cmaes"],
        '[study]\ntrials = 3\n[sampler]\nkind = "grid"\n[params."training.lr"]\ntype = "float"\nlow = 0.001\n'
        'high = 0.01': ["training.lr", "step"],
        '[study]\ntrials = 3\n[sampler]\nkind = "grid"\n[params."training.loss"]\ntype = "categorical"\n'
        'choices = ["bce", "ce"]': ["study.trials", "2 points"],
        '[study]\novrrides = []\n[params."training.lr"]\ntype = "float"\nlow = 0.001\nhigh = 0.01':
            ["study.ovrrides", "unknown option"],
        "[study]\ntrials = 3\n": ["[params]", "missing"],
    }
    for body, expected in cases.items():
        path = _space(tmp_path, ("" if body.startswith("[study]") else "[study]\ntrials = 3\n") + body)
        with pytest.raises(ConfigError) as caught:
            load_space(path, config)
        message = str(caught.value)
        for part in expected:
            assert part in message, f"{body!r}: {message!r} lacks {part!r}"
        assert str(path) in message
    # [params.training.lr] (TOML nesting) names the same option as [params."training.lr"]
    nested = load_space(_space(tmp_path, LR_SPACE.replace('[params."training.lr"]', "[params.training.lr]")), config)
    assert list(nested.params) == ["training.lr", "model.hidden_size"]
    # through the command line: exit code 2 and the key, nothing created
    bad = _space(tmp_path, '[study]\ntrials = 2\n[params."training.lrr"]\ntype = "float"\nlow = 0.001\nhigh = 0.01')
    result = CliRunner().invoke(app, ["tune", str(config), "--space", str(bad), "--study", "bad"])
    assert result.exit_code == 2
    assert '[params."training.lrr"]' in result.output and "unknown option" in " ".join(result.output.split())
    assert not (Path(os.environ["PRISMREC_HOME"]) / "tuning" / "bad.db").exists()


def test_shipped_space_files_check_against_their_run_configs():
    sasrec = load_space(REPO / "configs/tune/sasrec.toml", REPO / "configs/movielens_sasrec.toml")
    assert sasrec.trials == 30 and sasrec.settings.sampler.kind == "tpe"
    assert set(sasrec.params) == {"training.lr", "model.dropout", "model.hidden_size", "training.loss"}
    alpha = load_space(REPO / "configs/tune/dmesr_alpha.toml", REPO / "configs/movielens_dmesr_sasrec.toml")
    assert alpha.settings.sampler.kind == "grid" and alpha.grid_size == 5 and alpha.trials == 5
    assert alpha.params["model.alpha"].grid("model.alpha") == [0.01, 0.05, 0.1, 0.5, 1.0]
    assert alpha.seeds == (42, 43, 44)
    assert alpha.config_for({"model.alpha": 0.5}, 43).model.alpha == 0.5  # type: ignore[attr-defined]


def test_every_sampler_and_pruner_kind_builds_what_it_names(tiny, tmp_path):
    built = {}
    for sampler, pruner in (("tpe", "hyperband"), ("random", "median"), ("grid", "none")):
        body = LR_SPACE.replace('kind = "random"', f'kind = "{sampler}"').replace('kind = "none"', f'kind = "{pruner}"')
        if sampler == "grid":
            body = body.replace("log = true", "step = 0.009").replace("trials = 4", "trials = 8")
        space = load_space(_space(tmp_path, body, sampler), tiny / "tiny.toml")
        built[sampler] = space.settings.sampler.build(space.params, 0)
        built[pruner] = space.settings.pruner.build(max_epochs=6)
    assert isinstance(built["tpe"], optuna.samplers.TPESampler)
    assert isinstance(built["random"], optuna.samplers.RandomSampler)
    assert isinstance(built["grid"], optuna.samplers.GridSampler)
    assert isinstance(built["hyperband"], optuna.pruners.HyperbandPruner)
    assert isinstance(built["median"], optuna.pruners.MedianPruner)
    assert isinstance(built["none"], optuna.pruners.NopPruner)


def test_storage_urls_are_shown_without_their_password():
    shown = display_url("postgresql+psycopg2://tuner:s3cret@db.example:5432/optuna")
    assert "s3cret" not in shown and "tuner" in shown and "db.example" in shown


def _cli(*args: str) -> str:
    """The real command line, run in this process (the workers it starts are processes of their own)."""
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())


def test_two_worker_processes_share_one_sqlite_study_and_the_best_config_trains_back(tiny, tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("PRISMREC_HOME", str(home))
    space = _space(tmp_path, LR_SPACE, "lr")
    _cli("tune", str(tiny / "tiny.toml"), "--space", str(space), "--workers", "2", "--heartbeat", "2", "--quiet")
    trials = _trials(home, "lr")
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    assert len({t.user_attrs["pid"] for t in trials}) == 2  # both workers ran trials of the one study
    assert len({(t.params["training.lr"], t.params["model.hidden_size"]) for t in trials}) == 4
    dirs = _run_dirs(home, "lr")
    assert [d.name for d in dirs] == [f"trial-{n:04d}-seed42" for n in range(4)]
    for trial in trials:  # each trial is a normal run directory whose validation metric is the trial's value
        final = json.loads((Path(trial.user_attrs["run_dirs"][0]) / "final.json").read_text())
        assert final["metrics"]["valid/sampled"]["ndcg@10"] == trial.value

    reports = home / "reports" / "tuning"
    summary = json.loads((reports / "lr.json").read_text())
    best = max(trials, key=lambda t: t.value)
    assert summary["best_trial"] == best.number and summary["best_value"] == best.value
    assert summary["best_params"] == best.params
    assert set(summary["importances"]) == {"training.lr", "model.hidden_size"}
    assert abs(sum(summary["importances"].values()) - 1.0) < 1e-6
    assert (reports / "lr.png").stat().st_size > 10_000
    table = (reports / "lr.md").read_text()
    assert f"## Best: trial {best.number}" in table and "| `training.lr` |" in table
    assert "test/" not in json.dumps(summary)  # the study never sees test metrics (test/sampled, test/full)

    # the best config, as written, is a training config that reproduces the best trial
    best_toml = reports / "lr.best.toml"
    _cli("train", "--config", str(best_toml), "--quiet")
    run = next((home / "runs").glob("tiny-lr-best-*"))
    assert load_run_config(run).settings_hash() == load_run_config(Path(best.user_attrs["run_dirs"][0])).settings_hash()
    assert json.loads((run / "final.json").read_text())["metrics"]["valid/sampled"]["ndcg@10"] == best.value
    assert load_config(best_toml).training.lr == best.params["training.lr"]

    assert "nothing to run" in _cli("tune", str(tiny / "tiny.toml"), "--space", str(space), "--workers", "2")
    assert _run_dirs(home, "lr") == dirs and len(_trials(home, "lr")) == 4


def test_pruning_stops_a_diverging_trial(tiny, tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("PRISMREC_HOME", str(home))
    space_path = _space(tmp_path, """
        [study]
        trials = 3
        [sampler]
        kind = "random"
        [pruner]
        kind = "median"
        startup_trials = 2
        warmup_epochs = 1
        [params."training.lr"]
        type = "float"
        low = 0.001
        high = 50.0
        log = true
        """, "prune")
    config = tiny / "tiny.toml"
    space = load_space(space_path, config)
    url = f"sqlite:///{tmp_path / 'prune.db'}"
    study = create_or_check_study(open_storage(url, 2), "prune", space)
    for lr in (0.01, 0.02, 50.0):  # two sound trials, then one whose Adam steps blow the model up
        study.enqueue_trial({"training.lr": lr})
    run_worker(WorkerJob(str(config), str(space_path), [], "prune", url, 3, heartbeat=2))
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED]
    diverged = trials[2]
    pruned_at = max(diverged.intermediate_values)
    assert pruned_at < 6  # stopped before its epoch budget
    for good in trials[:2]:
        assert diverged.intermediate_values[pruned_at] < good.intermediate_values[pruned_at]
    run_dir = Path(diverged.user_attrs["run_dirs"][0])
    epochs = [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, pruned_at + 1)) and not (run_dir / "final.json").exists()


def test_grid_points_run_once_each_with_the_mean_over_seeds_as_objective(tiny, tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("PRISMREC_HOME", str(home))
    space_path = _space(tmp_path, """
        [study]
        seeds = [1, 2]
        overrides = ["training.max_epochs=2"]
        [sampler]
        kind = "grid"
        [pruner]
        kind = "none"
        [params."model.dropout"]
        type = "categorical"
        choices = [0.0, 0.3]
        """, "grid")
    config = tiny / "tiny.toml"
    url = f"sqlite:///{tmp_path / 'grid.db'}"
    study = create_or_check_study(open_storage(url, 2), "grid", load_space(space_path, config))
    run_worker(WorkerJob(str(config), str(space_path), [], "grid", url, 2, heartbeat=2))
    trials = study.get_trials()
    assert sorted(t.params["model.dropout"] for t in trials) == [0.0, 0.3]
    for trial in trials:
        dirs = [Path(d) for d in trial.user_attrs["run_dirs"]]
        assert [d.name for d in dirs] == [f"trial-{trial.number:04d}-seed{s}" for s in (1, 2)]
        values = [json.loads((d / "final.json").read_text())["metrics"]["valid/sampled"]["ndcg@10"] for d in dirs]
        assert [load_run_config(d).seed for d in dirs] == [1, 2]
        assert trial.value == pytest.approx(sum(values) / 2, abs=1e-12)
        assert load_run_config(dirs[0]).training.max_epochs == 2
    # the study remembers its space: reopening it with another is refused
    other = _space(tmp_path, Path(space_path).read_text().replace("0.3]", "0.4]"), "grid2")
    with pytest.raises(ConfigError, match="another run config or space"):
        create_or_check_study(open_storage(url, 2), "grid", load_space(other, config))


def test_full_mode_reports_the_full_ranking_validation_curve(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("PRISMREC_HOME", str(tmp_path / "home"))
    space_path = _space(tmp_path, """
        [study]
        mode = "full"
        metric = "hit@10"
        trials = 1
        overrides = ["training.max_epochs=3"]
        [sampler]
        kind = "random"
        [params."training.lr"]
        type = "float"
        low = 0.005
        high = 0.02
        """, "full")
    config, overrides = tiny / "tiny.toml", ["evaluation.full_ranking=true"]
    url = f"sqlite:///{tmp_path / 'full.db'}"
    study = create_or_check_study(open_storage(url, 2), "full", load_space(space_path, config, overrides))
    run_worker(WorkerJob(str(config), str(space_path), overrides, "full", url, 1, heartbeat=2))
    (trial,) = study.get_trials()
    run_dir = Path(trial.user_attrs["run_dirs"][0])
    final = json.loads((run_dir / "final.json").read_text())
    assert trial.value == final["metrics"]["valid/full"]["hit@10"] != final["metrics"]["valid/sampled"]["hit@10"]
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    sampled_curve = [json.loads(line)["valid"]["hit@10"] for line in lines]
    assert sorted(trial.intermediate_values) == [1, 2, 3]
    assert list(trial.intermediate_values.values()) != sampled_curve  # the curve is full ranking's, not sampled's
    assert trial.intermediate_values[final["best_epoch"]] == trial.value


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")
def test_a_trial_killed_before_its_first_heartbeat_is_failed_too(tiny, tmp_path):
    space = load_space(_space(tmp_path, LR_SPACE, "orphan"), tiny / "tiny.toml")
    study = create_or_check_study(open_storage(f"sqlite:///{tmp_path / 'orphan.db'}", 1), "orphan", space)
    orphan = study.ask()  # created RUNNING; no heartbeat, no objective: what a kill right after creating leaves
    alive = study.ask()
    alive.set_user_attr("pid", os.getpid())  # its objective started: heartbeats are the judge of it
    time.sleep(0.3)
    assert fail_orphans(study, grace=0.1) == [orphan.number]
    states = {t.number: t.state for t in study.get_trials()}
    assert states == {orphan.number: TrialState.FAIL, alive.number: TrialState.RUNNING}
    assert fail_orphans(study, grace=0.1) == []


def test_sigkill_mid_trial_then_tune_again_completes_the_study_and_runs_no_trial_twice(tiny, tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("PRISMREC_HOME", str(home))
    space = _space(tmp_path, LR_SPACE.replace("trials = 4", "trials = 2"), "kill")
    args = ("--workers", "2", "--heartbeat", "1", "--set", "training.max_epochs=60", "--set", "training.patience=500")
    proc = subprocess.Popen(_tune(tiny / "tiny.toml", space, *args), env=_env(home), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    killed = False
    try:  # watch the run directories (not the database: the test must not take its locks)
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
            logs = [d / "metrics.jsonl" for d in _run_dirs(home, "kill")]
            if len(logs) == 2 and all(log.exists() and log.read_text().count("\n") >= 1 for log in logs):
                os.killpg(proc.pid, signal.SIGKILL)  # the tune and both its workers, each mid-trial
                killed = True
                break
    finally:
        if proc.poll() is None and not killed:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert killed, "the trials ended before both were caught running"
    before = _trials(home, "kill")
    assert [t.state for t in before] == [TrialState.RUNNING] * 2  # as Optuna alone would leave them
    killed_numbers = [t.number for t in before]

    _cli("tune", str(tiny / "tiny.toml"), "--space", str(space), "--quiet", *args)  # tune again
    trials = _trials(home, "kill")
    by_number = {t.number: t for t in trials}
    for number in killed_numbers:
        assert by_number[number].state == TrialState.FAIL  # marked failed by the heartbeat check
        assert not (Path(by_number[number].user_attrs["run_dirs"][0]) / "final.json").exists()
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 2 and all(t.number not in killed_numbers for t in finished)
    retries = {t.user_attrs[RETRY_ATTR]: t for t in trials if RETRY_ATTR in t.user_attrs}
    assert sorted(retries) == killed_numbers  # each killed trial's parameters were queued once, as a new trial
    for number, retry in retries.items():
        assert retry.params == by_number[number].params and retry.state == TrialState.COMPLETE
    # no trial ran twice: one directory per trial number, each started once, never resumed
    dirs = _run_dirs(home, "kill")
    assert [d.name for d in dirs] == [f"trial-{t.number:04d}-seed42" for t in trials]
    for run_dir in dirs:
        assert "resumed" not in json.loads((run_dir / "meta.json").read_text())
    summary = json.loads((home / "reports" / "tuning" / "kill.json").read_text())
    assert summary["counts"]["killed"] == 2 and summary["counts"]["complete"] == 2


def test_the_cli_and_a_training_run_never_import_optuna(tiny, tmp_path):
    script = textwrap.dedent(f"""
        import sys
        from prismrec.cli.app import app
        assert "optuna" not in sys.modules, "importing the CLI loaded optuna"
        try:
            app(["train", "--config", {str(tiny / 'tiny.toml')!r}, "--set", "training.max_epochs=1", "--quiet"])
        except SystemExit as stop:
            assert not stop.code, stop.code
        print("loaded:", sorted(m for m in ("optuna", "sqlalchemy", "alembic") if m in sys.modules))
        """)
    done = subprocess.run([sys.executable, "-c", script], env=_env(tmp_path), capture_output=True, text=True,
                          timeout=200)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "loaded: []" in done.stdout
    assert list((tmp_path / "runs").glob("tiny-*/final.json"))
