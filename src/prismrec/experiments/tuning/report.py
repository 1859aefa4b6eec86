"""The report of a study: ``NAME.md`` and ``NAME.json`` (trials, best parameters, parameter importance),
``NAME.png`` (optimisation history and one slice per parameter) and ``NAME.best.toml``, the best trial's run
configuration, which ``prismrec train --config`` accepts as it is.

Importance is Optuna's fANOVA (:class:`optuna.importance.FanovaImportanceEvaluator`, a random forest from
scikit-learn, already pinned for sentence-transformers) over the complete trials.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prismrec.experiments.tuning.objective import ERROR_ATTR, RETRY_ATTR
from prismrec.experiments.tuning.space import FloatParam, IntParam, TuneSpace
from prismrec.options import dump_toml
from prismrec.training.runs import write_json

if TYPE_CHECKING:
    import optuna

IMPORTANCE_EVALUATOR = "fANOVA (optuna.importance.FanovaImportanceEvaluator, seed 0)"


def trial_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """One JSON-able row per trial, in trial order."""
    rows = []
    for trial in study.get_trials(deepcopy=False):
        steps = sorted(trial.intermediate_values)
        seconds = (trial.datetime_complete - trial.datetime_start).total_seconds() \
            if trial.datetime_complete and trial.datetime_start else None
        rows.append({
            "number": trial.number, "state": trial.state.name, "value": trial.value,
            "params": dict(trial.params), "seed_values": trial.user_attrs.get("seed_values", []),
            "epochs": trial.user_attrs.get("epochs", []), "best_epochs": trial.user_attrs.get("best_epochs", []),
            "last_epoch": steps[-1] if steps else None,
            "last_intermediate": trial.intermediate_values[steps[-1]] if steps else None,
            "seconds": seconds, "host": trial.user_attrs.get("host"), "pid": trial.user_attrs.get("pid"),
            "run_dirs": trial.user_attrs.get("run_dirs", []), "error": trial.user_attrs.get(ERROR_ATTR),
            "retry_of": trial.user_attrs.get(RETRY_ATTR),
            "killed": trial.state.name == "FAIL" and ERROR_ATTR not in trial.user_attrs,
        })
    return rows


def param_importances(study: optuna.Study) -> tuple[dict[str, float] | None, str]:
    """fANOVA importances, or None with the reason they cannot be computed yet."""
    import optuna
    from optuna.trial import TrialState

    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if len(complete) < 2:
        return None, f"needs at least 2 complete trials ({len(complete)} so far)"
    try:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
        values = optuna.importance.get_param_importances(study, evaluator=evaluator)
    except (ValueError, RuntimeError) as exc:
        return None, str(exc)
    return {k: float(v) for k, v in values.items()}, ""


def best_config_toml(space: TuneSpace, study_name: str, best: optuna.trial.FrozenTrial) -> str:
    """The best trial's run configuration at the space's first seed, as a TOML ``prismrec train`` reads."""
    base = space.base()
    config = space.config_for(dict(best.params), space.seeds[0], name=f"{base.name}-{study_name}-best")
    study = space.study
    header = [f"# Best trial of the study {study_name!r}: trial {best.number}, valid {study.mode} {study.metric} "
              f"{best.value:.4f}" + (f" (mean of seeds {', '.join(map(str, space.seeds))})" if len(space.seeds) > 1
                                     else ""),
              f"# parameters: {json.dumps(best.params, sort_keys=True)}",
              f"# prismrec train --config {study_name}.best.toml", ""]
    return "\n".join(header) + dump_toml(config.to_dict())


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e4):
            return f"{value:.3g}"
        return f"{value:.{digits}f}"
    return str(value)


def markdown(summary: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    metric = f"valid {summary['mode']} {summary['metric']}"
    lines = [f"# Tuning study `{summary['study']}`", "",
             f"Command: `{summary['command']}`", "",
             f"Run config `{summary['config']}`, space `{summary['space']}`, storage `{summary['storage']}`; sampler "
             f"{summary['sampler']}, pruner {summary['pruner']}; objective: {metric} of the best checkpoint"
             + (f", mean over seeds {summary['seeds']}" if len(summary["seeds"]) > 1
                else f" (seed {summary['seeds'][0]})")
             + ". The test split is never read.", "",
             f"Trials: {summary['counts']['complete']} complete, {summary['counts']['pruned']} pruned, "
             f"{summary['counts']['errors']} failed by an error, {summary['counts']['killed']} killed "
             f"(marked failed, parameters queued again once); target {summary['trials']} finished.", ""]
    if summary["best_trial"] is not None:
        lines += [f"## Best: trial {summary['best_trial']}, {metric} = {summary['best_value']:.4f}", "",
                  "| parameter | value |", "|---|---|"]
        lines += [f"| `{k}` | {_fmt(v, 6)} |" for k, v in summary["best_params"].items()]
        lines += ["", f"Best run configuration: `{summary['best_config']}` "
                  f"(`prismrec train --config {Path(summary['best_config']).name}`).", ""]
    lines += ["## Parameter importance", ""]
    if summary["importances"]:
        lines += [f"{summary['importance_evaluator']} over the complete trials.", "", "| parameter | importance |",
                  "|---|---:|"]
        lines += [f"| `{k}` | {v:.3f} |" for k, v in summary["importances"].items()]
    else:
        lines += [f"Not computed: {summary['importance_note']}."]
    lines += ["", f"![optimisation history and parameter slices]({Path(summary['figure']).name})", "",
              "## Trials", ""]
    names = list(summary["param_names"])
    lines += ["| # | state | value | " + " | ".join(f"`{n}`" for n in names) + " | epochs | seconds | note |",
              "|---:|---|---:|" + "---:|" * len(names) + "---:|---:|---|"]
    for row in rows:
        note = row["error"] or ("killed (worker stopped beating)" if row["killed"] else "")
        if row["retry_of"] is not None:
            note = (note + "; " if note else "") + f"retry of trial {row['retry_of']}"
        if row["state"] == "PRUNED":
            note = f"pruned after epoch {row['last_epoch']} ({_fmt(row['last_intermediate'])})"
        epochs = ",".join(map(str, row["epochs"])) or (str(row["last_epoch"]) if row["last_epoch"] else "-")
        lines.append(f"| {row['number']} | {row['state']} | {_fmt(row['value'])} | "
                     + " | ".join(_fmt(row["params"].get(n), 6) for n in names)
                     + f" | {epochs} | {_fmt(row['seconds'], 0)} | {note.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def write_figure(space: TuneSpace, rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Optimisation history (each complete trial, the best so far, pruned trials at their last value) above one
    slice per parameter (value against the parameter)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    names = list(space.params)
    columns = min(3, max(1, len(names)))
    slice_rows = math.ceil(len(names) / columns)
    fig = plt.figure(figsize=(4.2 * columns, 3.2 * (1 + slice_rows)))
    grid = fig.add_gridspec(1 + slice_rows, columns)
    history = fig.add_subplot(grid[0, :])
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    pruned = [r for r in rows if r["state"] == "PRUNED" and r["last_intermediate"] is not None]
    history.scatter([r["number"] for r in complete], [r["value"] for r in complete], s=18, label="complete")
    if pruned:
        history.scatter([r["number"] for r in pruned], [r["last_intermediate"] for r in pruned], marker="x",
                        color="grey", s=18, label="pruned (last validation)")
    best, xs, ys = -math.inf, [], []
    for row in complete:
        best = max(best, row["value"])
        xs.append(row["number"])
        ys.append(best)
    if xs:
        history.step(xs, ys, where="post", color="tab:red", label="best so far")
    metric = f"valid {space.study.mode} {space.study.metric}"
    history.set(title=title, xlabel="trial", ylabel=metric)
    history.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    history.legend(loc="lower right", fontsize=8)
    for i, name in enumerate(names):
        ax = fig.add_subplot(grid[1 + i // columns, i % columns])
        spec = space.params[name]
        values = [r["params"].get(name) for r in complete]
        scores = [r["value"] for r in complete]
        if isinstance(spec, FloatParam | IntParam):
            ax.scatter(values, scores, s=16, c=[r["number"] for r in complete], cmap="viridis")
            if spec.log:
                ax.set_xscale("log")
        else:
            labels = [str(c) for c in spec.choices]
            ax.scatter([labels.index(str(v)) for v in values], scores, s=16, c=[r["number"] for r in complete],
                       cmap="viridis")
            ax.set_xticks(range(len(labels)), labels)
        ax.set(xlabel=name, ylabel=metric if i % columns == 0 else "")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(study: optuna.Study, space: TuneSpace, out_dir: Path, command: str, storage: str,
                 counts: dict[str, int]) -> dict[str, Any]:
    """Write ``NAME.{md,json,png}`` and ``NAME.best.toml`` into ``out_dir``; returns their paths and the summary."""
    from optuna.trial import TrialState

    name = study.study_name
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = trial_rows(study)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    best = max(complete, key=lambda t: t.value) if complete else None  # type: ignore[arg-type, return-value]
    importances, note = param_importances(study)
    paths = {"table": out_dir / f"{name}.md", "json": out_dir / f"{name}.json", "figure": out_dir / f"{name}.png",
             "best_config": out_dir / f"{name}.best.toml"}
    if best is not None:
        paths["best_config"].write_text(best_config_toml(space, name, best), encoding="utf-8")
    settings = space.settings
    summary: dict[str, Any] = {
        "study": name, "command": command, "storage": storage, "config": str(space.base_config),
        "space": str(space.path), "metric": space.study.metric, "mode": space.study.mode, "direction": "maximize",
        "seeds": list(space.seeds), "trials": space.trials,
        "sampler": settings.sampler.kind, "pruner": settings.pruner.kind,
        "sampler_settings": settings.sampler.model_dump(mode="json"),
        "pruner_settings": settings.pruner.model_dump(mode="json"), "overrides": list(space.study.overrides),
        "param_names": list(space.params),
        "best_trial": best.number if best else None, "best_value": best.value if best else None,
        "best_params": dict(best.params) if best else {},
        "best_seed_values": best.user_attrs.get("seed_values", []) if best else [],
        "best_config": str(paths["best_config"]) if best else None,
        "importances": importances, "importance_evaluator": IMPORTANCE_EVALUATOR, "importance_note": note,
        "counts": counts, "figure": str(paths["figure"]),
    }
    write_figure(space, rows, paths["figure"], f"{name}: {space.settings.sampler.kind}, "
                 f"{len([r for r in rows if r['state'] == 'COMPLETE'])} complete trials")
    write_json(paths["json"], {**summary, "trials_detail": rows})
    paths["table"].write_text(markdown(summary, rows), encoding="utf-8")
    return {**{k: v for k, v in paths.items() if k != "best_config" or best}, "summary": summary, "rows": rows}
