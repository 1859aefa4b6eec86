"""Experiment grids end to end on MovieLens: tiny models, one epoch, real run directories and reports."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file as load_numpy
from scipy import stats

from prismrec.experiments import (
    expand_cells,
    load_experiment,
    paired_t_test,
    reproduce,
    restrict_backbones,
    restrict_methods,
)
from prismrec.experiments.report import Row, _significance_table
from prismrec.experiments.runner import PER_USER_FILE, CellBusyError, NotFinishedError, cell_dir
from prismrec.options import ConfigError

from conftest import SHARED_DATA

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = ["model.max_len=10", "model.hidden_size=16", "training.max_epochs=1",
        "training.batch_size=256", "training.num_threads=1", "evaluation.ks=[10]", "evaluation.batch_size=1024"]

pytestmark = pytest.mark.skipif(not (SHARED_DATA / "movielens-small").is_dir(),
                                reason="../shared/data/movielens-small is not present")


def _experiment(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(f'name = "{name}"\nconfig_root = "{CONFIGS}"\n' + textwrap.dedent(body), encoding="utf-8")
    return path


GRID = """
    seeds = [42, 43]
    proposed = "GRU"
    paper_table = "table2"
    figures = ["longtail", "methods"]
    overrides = {tiny}

    [[methods]]
    name = "None"
    config = "movielens_{{backbone}}.toml"
    overrides = ["model.num_blocks=1"]

    [[methods]]
    name = "GRU"
    config = "movielens_gru4rec.toml"
    overrides = ["model.num_layers=1"]

    [[backbones]]
    name = "sasrec"
"""


def test_paired_t_test_matches_scipy():
    rng = np.random.default_rng(0)
    a = rng.random(50)
    b = a - 0.05 + 0.1 * rng.random(50)
    assert paired_t_test(a, b) == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert paired_t_test(np.array([1.0, 0.0, 1.0, 1.0]), np.array([0.0, 0.0, 1.0, 0.0])) == pytest.approx(
        stats.ttest_rel([1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0]).pvalue)
    assert paired_t_test(np.ones(5), np.ones(5)) == 1.0  # identical: no evidence of a difference
    with pytest.raises(ValueError, match="align"):
        paired_t_test(np.ones(3), np.ones(4))


def test_bad_experiment_files_name_the_problem(tmp_path):
    path = _experiment(tmp_path, "bad", """
        proposed = "Nope"
        [[methods]]
        name = "None"
        config = "movielens_sasrec.toml"
        [[backbones]]
        name = "sasrec"
    """)
    with pytest.raises(ConfigError, match="proposed = 'Nope'"):
        load_experiment(path)
    path = _experiment(tmp_path, "typo", """
        proposed = "None"
        [[methods]]
        name = "None"
        config = "movielens_sasrec.toml"
        overrides = ["training.lrr=0.1"]
        [[backbones]]
        name = "sasrec"
    """)
    with pytest.raises(ConfigError, match=r"training\.lrr"):
        expand_cells(load_experiment(path), "movielens-small")


def test_backbone_subset_keeps_cell_hashes(tmp_path):
    spec = load_experiment(CONFIGS / "experiments" / "table2.toml")
    everything = {c.cell_id: c.config.config_hash() for c in expand_cells(spec, "movielens-small", [42])}
    subset = expand_cells(restrict_backbones(spec, ["gru4rec"]), "movielens-small", [42])
    assert [c.backbone for c in subset] == ["gru4rec"] * len(spec.methods)
    # A grid run one backbone at a time reuses the same cells as the whole grid.
    assert all(everything[c.cell_id] == c.config.config_hash() for c in subset)
    with pytest.raises(ConfigError, match="unknown backbone"):
        restrict_backbones(spec, ["sasrec", "transformer"])


def test_method_subset_keeps_cell_hashes():
    spec = load_experiment(CONFIGS / "experiments" / "table2.toml")
    everything = {c.cell_id: c.config.config_hash() for c in expand_cells(spec, "movielens-small", [42])}
    subset = expand_cells(restrict_methods(restrict_backbones(spec, ["bert4rec"]), ["None", "DMESR"]),
                          "movielens-small", [42])
    assert [(c.method, c.backbone) for c in subset] == [("None", "bert4rec"), ("DMESR", "bert4rec")]
    # The proposed method and the plain backbone first; the rest of the grid later reuses these two cells.
    assert all(everything[c.cell_id] == c.config.config_hash() for c in subset)
    assert restrict_methods(spec, None) is spec
    with pytest.raises(ConfigError, match=r"unknown method.*DMSER"):
        restrict_methods(spec, ["DMSER"])


def test_a_grid_missing_semantics_stops_before_training_anything(tmp_path, monkeypatch):
    """The Figure 4 grid names one artefact per derivation backend: one that was never derived stops the grid
    up front with the command that derives it, instead of after hours of the methods before it."""
    from typer.testing import CliRunner

    from prismrec.cli.app import app
    from prismrec.semantics.artefact import ArtefactError, load_artefact

    path = _experiment(tmp_path, "backends", """
        seeds = [42]
        proposed = "DMESR-never-derived"
        [[methods]]
        name = "None"
        config = "movielens_{backbone}.toml"
        [[methods]]
        name = "DMESR-never-derived"
        config = "movielens_dmesr_sasrec.toml"
        overrides = ['model.semantics="{dataset}-local-llm"']
        [[backbones]]
        name = "sasrec"
    """)
    monkeypatch.setenv("PRISMREC_HOME", str(tmp_path / "home"))
    runs = tmp_path / "runs"
    with pytest.raises(ArtefactError) as error:
        reproduce(path, "movielens-small", overrides=TINY, out_dir=tmp_path / "out", runs_root=runs, quiet=True)
    assert ("movielens-small-local-llm: prismrec derive movielens-small --backend local-llm --name "
            "movielens-small-local-llm") in str(error.value)
    assert "DMESR-never-derived-sasrec-s42" in str(error.value)
    assert not runs.exists() or not any(runs.iterdir())  # not even the None cell trained
    dry = CliRunner().invoke(app, ["reproduce", str(path), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "missing semantics movielens-small-local-llm (1 cell(s))" in " ".join(dry.output.split())
    # Leaving the method out runs the rest.
    done = reproduce(path, "movielens-small", overrides=TINY, out_dir=tmp_path / "out", runs_root=runs, quiet=True,
                     methods=["None"])
    assert done["trained"] == ["None-sasrec-s42"]
    # A model loading it directly says the same (a bare --name would write describe semantics under that name).
    with pytest.raises(ArtefactError, match="prismrec derive yelp --backend openai --base-url URL --model MODEL "
                       "--name yelp-openai"):
        load_artefact("yelp-openai")


def test_grid_runs_reuses_extends_and_reports(tmp_path):
    path = _experiment(tmp_path, "tiny", GRID.format(tiny=json.dumps(TINY)))
    runs, out = tmp_path / "runs", tmp_path / "report"
    first = reproduce(path, "movielens-small", overrides=[], out_dir=out, runs_root=runs, quiet=True)
    assert len(first["results"]) == 4 and len(first["trained"]) == 4
    checkpoints = {r.cell.cell_id: (r.run_dir / "model.safetensors").stat().st_mtime_ns for r in first["results"]}
    for result in first["results"]:
        assert (result.run_dir / PER_USER_FILE).exists()
        cell = json.loads((result.run_dir / "cell.json").read_text())
        assert cell["wall_seconds"] > 0 and cell["config_hash"] == result.cell.config.config_hash()

    # Same grid again: nothing trains, every run directory is reused untouched.
    second = reproduce(path, "movielens-small", out_dir=out, runs_root=runs, quiet=True)
    assert second["trained"] == []
    assert {r.cell.cell_id: (r.run_dir / "model.safetensors").stat().st_mtime_ns
            for r in second["results"]} == checkpoints
    # Extended by a seed, one method first; a report of what is finished so far trains nothing and says what
    # it left out.
    partial = reproduce(path, "movielens-small", seeds=[44], methods=["None"], out_dir=tmp_path / "partial",
                        runs_root=runs, quiet=True)
    assert partial["trained"] == ["None-sasrec-s44"]
    so_far = reproduce(path, "movielens-small", seeds=[42, 43, 44], out_dir=tmp_path / "so-far", runs_root=runs,
                       quiet=True, finished_only=True)
    assert so_far["trained"] == [] and [c.cell_id for c in so_far["missing"]] == ["GRU-sasrec-s44"]
    assert len(so_far["results"]) == 5
    seeds_per_row = {(r.method, r.mode, r.subset): r.n_seeds for r in so_far["rows"] if r.metric == "hit@10"}
    assert seeds_per_row[("None", "sampled", "all")] == 3 and seeds_per_row[("GRU", "sampled", "all")] == 2
    partial_table = (tmp_path / "so-far" / "tiny.md").read_text()
    gru_hit = next(r for r in so_far["rows"] if (r.method, r.metric, r.mode, r.subset) == ("GRU", "hit@10", "sampled",
                                                                                             "all"))
    assert f"{gru_hit.mean:.4f} ± {gru_hit.std:.4f} (2 seeds)" in partial_table
    assert "Not finished yet: 1 cell(s)" in partial_table and "GRU-sasrec-s44" in partial_table
    # The test pairs only the seeds GRU has (42, 43) while None's row is over three: the report says so and
    # gives both means over the tested seeds, so a `*` has a direction.
    assert gru_hit.best_baseline == "None" and gru_hit.test_seeds == [42, 43]
    none_finals = {r.cell.seed: json.loads((r.run_dir / "final.json").read_text())["metrics"]["test/sampled"]["hit@10"]
                   for r in so_far["results"] if r.cell.method == "None"}
    assert gru_hit.baseline_test_mean == pytest.approx(np.mean([none_finals[42], none_finals[43]]))
    assert gru_hit.test_mean == pytest.approx(gru_hit.mean)
    assert "Tests on fewer seeds than the rows they compare" in partial_table
    assert (f"- sasrec, H@10 s100: GRU {gru_hit.test_mean:.4f} vs None {gru_hit.baseline_test_mean:.4f} on seed(s) "
            f"42, 43, p = {gru_hit.p_value:.2g}") in partial_table
    # Extended by the seed: only the cell still missing trains.
    third = reproduce(path, "movielens-small", seeds=[42, 43, 44], out_dir=out, runs_root=runs, quiet=True)
    assert third["trained"] == ["GRU-sasrec-s44"]

    rows = json.loads((out / "tiny.json").read_text())
    assert {tuple(sorted(k for k in row if k in {"backbone", "method", "metric", "mode", "mean", "std", "paper",
                                                 "p_value"})) for row in rows} == {
        ("backbone", "mean", "method", "metric", "mode", "p_value", "paper", "std")}
    by_key = {(r["method"], r["metric"], r["mode"], r["subset"]): r for r in rows}
    none_hit = by_key[("None", "hit@10", "sampled", "all")]
    assert none_hit["paper"] == 0.4951 and none_hit["n_seeds"] == 3  # Table 2, SASRec, MovieLens
    assert by_key[("None", "hit@10", "full", "all")]["paper"] is None
    finals = [json.loads((r.run_dir / "final.json").read_text()) for r in third["results"] if r.cell.method == "None"]
    values = [f["metrics"]["test/sampled"]["hit@10"] for f in finals]
    assert none_hit["mean"] == pytest.approx(np.mean(values))
    assert none_hit["std"] == pytest.approx(np.std(values, ddof=1))

    # The p-values are scipy's paired tests over *users*: each method's per-user arrays averaged over the
    # seeds first (the same users re-measured), never seeds x users concatenated.
    gru_ndcg = by_key[("GRU", "ndcg@10", "full", "all")]
    assert gru_ndcg["best_baseline"] == "None"
    per_user = {(r.cell.method, r.cell.seed): r.per_user() for r in third["results"]}
    users = per_user[("GRU", 42)]["test/full/users"]
    assert all(np.array_equal(per_user[(m, s)]["test/full/users"], users) for m in ("GRU", "None")
               for s in (42, 43, 44))
    ours = np.mean([per_user[("GRU", s)]["test/full/ndcg@10"] for s in (42, 43, 44)], axis=0)
    theirs = np.mean([per_user[("None", s)]["test/full/ndcg@10"] for s in (42, 43, 44)], axis=0)
    assert gru_ndcg["n_users"] == len(users) == len(ours)
    assert gru_ndcg["p_value"] == pytest.approx(stats.ttest_rel(ours, theirs).pvalue)
    assert gru_ndcg["p_value_wilcoxon"] == pytest.approx(stats.wilcoxon(ours, theirs).pvalue)
    assert gru_ndcg["diff_vs_baseline"] == pytest.approx(float(np.mean(ours - theirs)))
    assert gru_ndcg["diff_ci95_low"] <= gru_ndcg["diff_vs_baseline"] <= gru_ndcg["diff_ci95_high"]
    assert gru_ndcg["ci95_low"] <= gru_ndcg["mean"] <= gru_ndcg["ci95_high"]
    assert gru_ndcg["min_detectable_diff"] > 0
    assert gru_ndcg["test_seeds"] == [42, 43, 44] and gru_ndcg["test_mean"] == pytest.approx(gru_ndcg["mean"])
    assert by_key[("None", "ndcg@10", "full", "all")]["p_value"] is None
    longtail = by_key[("GRU", "hit@10", "sampled", "longtail")]
    mask = np.concatenate([per_user[("GRU", s)]["test/sampled/longtail"] for s in (42, 43, 44)]).astype(bool)
    assert 0 < mask.sum() < len(mask)
    assert longtail["n_seeds"] == 3

    table = (out / "tiny.md").read_text()
    none_line = next(line for line in table.splitlines() if line.startswith("| sasrec | None |"))
    assert f"{none_hit['mean']:.4f} ± {none_hit['std']:.4f}" in none_line
    assert "0.4951" in none_line and f"{none_hit['mean'] - 0.4951:+.4f}" in none_line
    gru_line = next(line for line in table.splitlines() if line.startswith("| sasrec | GRU |"))
    star = "*" if gru_ndcg["p_value"] < 0.05 else ""
    assert (f"{gru_ndcg['mean']:.4f} ± {gru_ndcg['std']:.4f} [{gru_ndcg['ci95_low']:.4f}, "
            f"{gru_ndcg['ci95_high']:.4f}]{star} |") in gru_line
    assert "minus the best baseline of the same backbone, over test users" in table
    assert f"| {gru_ndcg['n_users']} | {gru_ndcg['diff_vs_baseline']:+.4f} [" in table
    assert "GRU-sasrec-s44" in table and "Not finished" not in table  # wall time per cell
    assert "Tests on fewer seeds" not in table
    for figure in ("tiny.longtail.png", "tiny.png"):  # named after the experiment: no clash in a shared --out
        assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_keep_rows_joins_backbones_run_on_different_machines(tmp_path):
    """A grid finished backbone by backbone, the first backbone's run directories gone in between (a fresh
    machine), still ends in one table: --keep-rows carries the earlier rows, p-values and cell times."""
    body = GRID.format(tiny=json.dumps(TINY)).replace('overrides = ["model.num_blocks=1"]', "")
    path = _experiment(tmp_path, "joined", body + '\n    [[backbones]]\n    name = "gru4rec"\n    label = "GRU4Rec"\n')
    out = tmp_path / "report"
    first = reproduce(path, "movielens-small", seeds=[42], out_dir=out, runs_root=tmp_path / "machine-a",
                      quiet=True, backbones=["sasrec"], command="first command")
    sasrec_rows = json.loads((out / "joined.json").read_text())
    assert {r["backbone"] for r in sasrec_rows} == {"sasrec"}

    second = reproduce(path, "movielens-small", seeds=[42], out_dir=out, runs_root=tmp_path / "machine-b",
                       quiet=True, backbones=["gru4rec"], keep_rows=True, command="second command")
    # sasrec not retrained; and this test grid's gru4rec "GRU" cell has the settings of its "None" cell, so
    # it is reused from it, not trained twice.
    assert second["trained"] == ["None-gru4rec-s42"]
    assert second["results"][1].reused and second["results"][1].run_dir == second["results"][0].run_dir
    rows = json.loads((out / "joined.json").read_text())
    assert [r for r in rows if r["backbone"] == "sasrec"] == sasrec_rows  # carried unchanged
    gru_rows = [r for r in rows if r["backbone"] == "gru4rec"]
    assert gru_rows and all(r["n_seeds"] == 1 for r in gru_rows)
    table = (out / "joined.md").read_text()
    assert "| sasrec | None |" in table  # the test grid gives sasrec no label
    assert "| GRU4Rec | None |" in table and "kept from an earlier invocation" in table
    gru_none = next(r for r in gru_rows if (r["method"], r["metric"], r["mode"]) == ("None", "hit@10", "sampled"))
    # No "± 0.0000" for one seed; the interval over users is still there.
    assert f"| GRU4Rec | None | {gru_none['mean']:.4f} (1 seed) [{gru_none['ci95_low']:.4f}, " in table
    assert "first command" in table and "second command" in table
    cells = json.loads((out / "joined.cells.json").read_text())
    assert [c["cell"] for c in cells] == [*(r.cell.cell_id for r in first["results"]),
                                          *(r.cell.cell_id for r in second["results"])]
    assert all(c["seconds"] > 0 for c in cells)
    assert all(f"| {c['cell']} | {c['seconds']:.1f} |" in table for c in cells)

    # Without --keep-rows the report holds what this invocation ran, nothing else.
    third = reproduce(path, "movielens-small", seeds=[42], out_dir=out, runs_root=tmp_path / "machine-b",
                      quiet=True, backbones=["gru4rec"])
    assert third["trained"] == []
    assert {r["backbone"] for r in json.loads((out / "joined.json").read_text())} == {"gru4rec"}

    # --finished-only trains nothing: a seed with no finished cell has nothing to report, and a cell whose
    # files are for other data (here its recorded fingerprint edited) is an error, not a silent retrain.
    with pytest.raises(ValueError, match=r"no finished cells to report.*2 not finished"):
        reproduce(path, "movielens-small", seeds=[43], out_dir=tmp_path / "none", runs_root=tmp_path / "machine-b",
                  quiet=True, backbones=["gru4rec"], finished_only=True)
    meta_path = third["results"][0].run_dir / "meta.json"  # the one run directory both gru4rec cells come from
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "data_fingerprint": "other data"}))
    with pytest.raises(NotFinishedError, match="rerun without --finished-only"):
        reproduce(path, "movielens-small", seeds=[42], out_dir=tmp_path / "none", runs_root=tmp_path / "machine-b",
                  quiet=True, backbones=["gru4rec"], finished_only=True)


def test_cell_records_outlive_the_run_directories(tmp_path):
    """--records: finished cells are copied (without weights) to a folder that survives a fresh machine."""
    path = _experiment(tmp_path, "recorded", GRID.format(tiny=json.dumps(TINY)))
    records = tmp_path / "records"
    first = reproduce(path, "movielens-small", seeds=[42], out_dir=tmp_path / "a", runs_root=tmp_path / "machine-a",
                      quiet=True, records=records)
    assert len(first["trained"]) == 2
    for result in first["results"]:
        record = records / result.run_dir.name
        assert sorted(p.name for p in record.iterdir()) == ["cell.json", "config.toml", "final.json", "meta.json",
                                                            PER_USER_FILE]
        kept = load_numpy(str(record / PER_USER_FILE))
        assert {k.rsplit("/", 1)[1] for k in kept} == {"users", "longtail", "hit@10", "ndcg@10"}
        full = result.per_user()
        assert all(np.array_equal(kept[k], full[k]) for k in kept)
    # A fresh machine: no run directories, only the records. Nothing trains and the report is the same.
    second = reproduce(path, "movielens-small", seeds=[42], out_dir=tmp_path / "b", runs_root=tmp_path / "machine-b",
                       quiet=True, records=records)
    assert second["trained"] == [] and not (tmp_path / "machine-b").exists()
    assert json.loads((tmp_path / "b" / "recorded.json").read_text()) == json.loads(
        (tmp_path / "a" / "recorded.json").read_text())
    # A record for another config (changed hash) is not reused: that cell trains.
    third = reproduce(path, "movielens-small", seeds=[42], overrides=["training.lr=0.002"], out_dir=tmp_path / "c",
                      runs_root=tmp_path / "machine-b", quiet=True, records=records)
    assert len(third["trained"]) == 2


def test_a_cell_of_equal_settings_from_another_experiment_is_reused(tmp_path):
    """Table 2's DMESR, the alpha sweep's alpha = 0.1 and the mllm grid's describe column are the same training:
    a cell whose settings (config without its name) equal a finished cell's on the same data reuses it."""
    one = _experiment(tmp_path, "one", GRID.format(tiny=json.dumps(TINY)))
    # Another experiment: its "Plain" method is "None" under another name; its "Wider" one differs.
    other = _experiment(tmp_path, "other", f"""
        seeds = [42]
        proposed = "Wider"
        overrides = {json.dumps(TINY)}
        [[methods]]
        name = "Plain"
        config = "movielens_{{backbone}}.toml"
        overrides = ["model.num_blocks=1"]
        [[methods]]
        name = "Wider"
        config = "movielens_{{backbone}}.toml"
        overrides = ["model.num_blocks=2"]
        [[backbones]]
        name = "sasrec"
    """)
    records, runs = tmp_path / "records", tmp_path / "machine-a"
    first = reproduce(one, "movielens-small", seeds=[42], out_dir=tmp_path / "a", runs_root=runs, quiet=True)
    none_dir = next(r.run_dir for r in first["results"] if r.cell.method == "None")
    second = reproduce(other, "movielens-small", out_dir=tmp_path / "b", runs_root=runs, quiet=True, records=records)
    assert second["trained"] == ["Wider-sasrec-s42"]
    plain = next(r for r in second["results"] if r.cell.method == "Plain")
    assert plain.reused and plain.run_dir == none_dir
    assert (records / none_dir.name / PER_USER_FILE).exists()  # recorded under its own name, so it outlives runs
    table = (tmp_path / "b" / "other.md").read_text()
    assert f"| Plain-sasrec-s42 | {plain.wall_seconds:.1f} | `{none_dir.name}` |" in table
    assert "a run directory named after another cell holds a cell of equal settings" in table
    # A fresh machine with the records only: still nothing to train; other settings are not reused.
    third = reproduce(other, "movielens-small", out_dir=tmp_path / "c", runs_root=tmp_path / "machine-b",
                      quiet=True, records=records)
    assert third["trained"] == []
    changed = reproduce(other, "movielens-small", overrides=["training.lr=0.002"], out_dir=tmp_path / "d",
                        runs_root=tmp_path / "machine-b", quiet=True, methods=["Plain"])
    assert changed["trained"] == ["Plain-sasrec-s42"]


def test_sweep_figure(tmp_path):
    path = _experiment(tmp_path, "sweep", f"""
        seeds = [42]
        proposed = "None"
        figures = ["sweep"]
        overrides = {json.dumps([o for o in TINY if not o.startswith("model.hidden_size")])}
        [[methods]]
        name = "None"
        config = "movielens_{{backbone}}.toml"
        [[backbones]]
        name = "sasrec"
        [[axes]]
        name = "d"
        key = "model.hidden_size"
        values = [8, 16]
    """)
    report = reproduce(path, "movielens-small", out_dir=tmp_path / "out", runs_root=tmp_path / "runs", quiet=True)
    assert [r.cell.cell_id for r in report["results"]] == ["None-sasrec-d8-s42", "None-sasrec-d16-s42"]
    assert [r.cell.config.model.hidden_size for r in report["results"]] == [8, 16]
    assert (tmp_path / "out" / "d.png").read_bytes()[:4] == b"\x89PNG"
    table = (tmp_path / "out" / "sweep.md").read_text()
    assert "| Backbone | Method | d |" in table

    # A cell killed after its last checkpoint but before its results: the runner resumes it (no retraining
    # of finished epochs) and ends with the same metrics.
    killed = report["results"][1]
    before = json.loads((killed.run_dir / "final.json").read_text())["metrics"]
    (killed.run_dir / "final.json").unlink()
    (killed.run_dir / PER_USER_FILE).unlink()
    again = reproduce(path, "movielens-small", out_dir=tmp_path / "out", runs_root=tmp_path / "runs", quiet=True)
    assert again["trained"] == ["None-sasrec-d16-s42"]
    assert json.loads((killed.run_dir / "cell.json").read_text())["resumed"] is True
    assert json.loads((killed.run_dir / "final.json").read_text())["metrics"] == before


@pytest.mark.parametrize(("dataset", "paper_hit"), [("yelp", 0.6346), ("amazon-games", 0.5574)])
def test_cli_on_the_yelp_and_amazon_games_fixtures(tmp_path, dataset, paper_hit):
    """The same command on the other datasets: their loaders' fixtures, through the CLI."""
    from typer.testing import CliRunner

    from prismrec.cli.app import app

    if dataset == "yelp":
        from test_data_yelp import write_fixture

        write_fixture(tmp_path / "data" / "yelp", gz=False)
    else:
        from test_data_amazon import write_fixture as write_amazon

        write_amazon(tmp_path / "data" / "amazon-games", release="2018", gz=True)
    path = _experiment(tmp_path, "other-tiny", """
        seeds = [42, 43]
        proposed = "GRU"
        paper_table = "table2"
        [[methods]]
        name = "None"
        config = "movielens_{backbone}.toml"
        [[methods]]
        name = "GRU"
        config = "movielens_gru4rec.toml"
        [[backbones]]
        name = "sasrec"
    """)
    args = ["reproduce", str(path), "--dataset", dataset, "--data-dir", str(tmp_path / "data"),
            "--out", str(tmp_path / "out"), "--quiet", "--set", "evaluation.num_negatives=5"]
    for override in TINY:
        args += ["--set", override]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "4 cells (4 trained now, 0 reused)" in result.output
    rows = json.loads((tmp_path / "out" / "other-tiny.json").read_text())
    none_hit = next(r for r in rows if (r["method"], r["metric"], r["mode"], r["subset"]) ==
                    ("None", "hit@10", "sampled", "all"))
    assert none_hit["paper"] == paper_hit  # Table 2, SASRec, this dataset
    assert f"--dataset {dataset}" in (tmp_path / "out" / "other-tiny.md").read_text()
    dry = CliRunner().invoke(app, [*args, "--dry-run"])
    assert dry.exit_code == 0 and "4 cells: 4 done, 0 left" in dry.output


def test_a_cell_another_process_is_training_is_not_trained_twice(tmp_path):
    """Two invocations whose grids overlap must not train one cell into one directory at the same time (the
    second would resume from the first's checkpoint and replace its log under it): the second stops with an
    error naming the cell and the process holding it, and trains once the first is done."""
    path = _experiment(tmp_path, "tiny", GRID.format(tiny=json.dumps(TINY)))
    runs = tmp_path / "runs"
    first = expand_cells(load_experiment(path), "movielens-small", [42])[0]
    busy = cell_dir(runs, first)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from prismrec.experiments.runner import cell_lock\n"
         "with cell_lock(Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(120)", str(busy)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(CellBusyError, match=rf"{first.cell_id}.*pid {holder.pid}"):
            reproduce(path, "movielens-small", seeds=[42], out_dir=tmp_path / "report", runs_root=runs, quiet=True)
        assert not (busy / "metrics.jsonl").exists()  # nothing written into the other process's cell
    finally:
        holder.kill()
        holder.wait()
    # The lock dies with its process: no stale lock to clear by hand.
    done = reproduce(path, "movielens-small", seeds=[42], out_dir=tmp_path / "report", runs_root=runs, quiet=True)
    assert first.cell_id in done["trained"] and (busy / "final.json").exists()


# A grid whose loss is chosen on seed 42's validation (the strong protocol's rule), appended to GRID.
LOSS_CHOSEN_ON_SEED_42 = """
    [select]
    axis = "loss"
    seeds = [42]

    [[axes]]
    name = "loss"
    key = "training.loss"
    values = ["bce", "ce"]
    """


def test_select_axis_is_chosen_on_validation_and_only_the_choice_trains_later_seeds(tmp_path):
    """[select]: both losses train on the selection seed, the one with the higher validation NDCG@10 is kept per
    method, the other seed trains only it, and the report's rows are over the chosen cells (no loss column, the
    choice beside the row; every trained cell in the time table)."""
    path = _experiment(tmp_path, "selected", GRID.format(tiny=json.dumps(TINY)) + LOSS_CHOSEN_ON_SEED_42)
    out, runs = tmp_path / "report", tmp_path / "runs"
    report = reproduce(path, "movielens-small", out_dir=out, runs_root=runs, quiet=True)
    selection = report["selection"]
    trained = report["trained"]
    assert sorted(c for c in trained if c.endswith("-s42")) == sorted(
        f"{m}-sasrec-loss{loss}-s42" for m in ("None", "GRU") for loss in ("bce", "ce"))
    for method in ("None", "GRU"):
        group = (method, "sasrec", ())
        run_dirs = {r.cell.cell_id: r.run_dir for r in report["results"]}
        finals = {loss: json.loads((run_dirs[f"{method}-sasrec-loss{loss}-s42"] / "final.json").read_text())
                  ["metrics"]["valid/sampled"]["ndcg@10"] for loss in ("bce", "ce")}
        expected = max(("bce", "ce"), key=lambda loss: (finals[loss], loss == "bce"))
        assert selection.chosen[group] == expected
        # Seed 43 trained the chosen loss only.
        assert [c for c in trained if c.startswith(f"{method}-") and c.endswith("-s43")] == [
            f"{method}-sasrec-loss{expected}-s43"]
    rows = json.loads((out / "selected.json").read_text())
    assert all(r["axes"] == {} and r["selected"]["loss"] in ("bce", "ce") for r in rows)
    none_hit = next(r for r in rows if (r["method"], r["metric"], r["mode"], r["subset"]) == ("None", "hit@10",
                                                                                            "sampled", "all"))
    assert none_hit["n_seeds"] == 2 and none_hit["selected"]["loss"] == selection.chosen[("None", "sasrec", ())]
    table = (out / "selected.md").read_text()
    assert "is chosen per method and backbone on validation, never on test" in table
    assert "| Backbone | Method | loss (chosen) | H@10 s100 |" in table
    assert all(f"| {cell} |" in table for cell in trained)  # the values not chosen count in the time table
    saved = json.loads((out / "selected.selection.json").read_text())
    assert {(r["method"], r["chosen"]) for r in saved} == {(m, selection.chosen[(m, "sasrec", ())])
                                                           for m in ("None", "GRU")}
    # A second invocation trains nothing and makes the same choice.
    again = reproduce(path, "movielens-small", out_dir=out, runs_root=runs, quiet=True)
    assert again["trained"] == [] and again["selection"].chosen == selection.chosen


def test_cells_waiting_for_a_selection_count_once_per_seed(tmp_path):
    """A report written part-way through a [select] grid names what is left to train: a method whose selection
    cells are not finished has one cell per later seed left (whichever value wins), not one per value."""
    from typer.testing import CliRunner

    from prismrec.cli.app import app

    path = _experiment(tmp_path, "waiting", GRID.format(tiny=json.dumps(TINY)) + LOSS_CHOSEN_ON_SEED_42)
    out, runs, records = tmp_path / "report", tmp_path / "runs", tmp_path / "records"
    done = reproduce(path, "movielens-small", seeds=[42], out_dir=out, runs_root=runs, quiet=True, methods=["None"],
                     records=records)
    assert sorted(done["trained"]) == ["None-sasrec-lossbce-s42", "None-sasrec-lossce-s42"]
    partial = reproduce(path, "movielens-small", seeds=[42, 43], out_dir=out, runs_root=runs, quiet=True,
                        finished_only=True, records=records)
    chosen = partial["selection"].chosen[("None", "sasrec", ())]
    # GRU: both selection cells, then one seed-43 cell with its loss still to choose; None: its chosen loss.
    assert sorted(c.cell_id for c in partial["missing"]) == sorted(
        ["GRU-sasrec-lossbce-s42", "GRU-sasrec-lossce-s42", "GRU-sasrec-s43", f"None-sasrec-loss{chosen}-s43"])
    table = (out / "waiting.md").read_text()
    assert "Not finished yet: 4 cell(s)" in table and "a cell named without `loss` trains with the value" in table
    dry = CliRunner().invoke(app, ["reproduce", str(path), "--dataset", "movielens-small", "--seeds", "42,43",
                                   "--records", str(records), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "later: 1 cells train" in dry.output and "5 cells: 2 done, 3 left" in dry.output


def test_select_must_name_an_axis(tmp_path):
    path = _experiment(tmp_path, "badselect", GRID.format(tiny=json.dumps(TINY)) + """
    [select]
    axis = "los"
    """)
    with pytest.raises(ConfigError, match=r"select\.axis = 'los' is not one of the axes"):
        load_experiment(path)


def test_axis_columns_follow_the_header_order(tmp_path):
    """Two axes whose names sort against their order in the file (window before loss): every value sits under
    its own column (the recipes table once printed the losses under `window`)."""
    from prismrec.experiments.report import Row, _metric_table

    path = _experiment(tmp_path, "order", """
        seeds = [42]
        proposed = "None"
        metrics = ["hit@10"]
        [[methods]]
        name = "None"
        config = "movielens_{backbone}.toml"
        [[backbones]]
        name = "sasrec"
        [[axes]]
        name = "window"
        key = "training.window"
        values = ["last", "sliding"]
        [[axes]]
        name = "loss"
        key = "training.loss"
        values = ["bce", "ce"]
    """)
    spec = load_experiment(path)
    rows = [Row("sasrec", "None", "hit@10", mode, 0.5, 0.0, None, None, axes={"window": "sliding", "loss": "ce"},
                n_seeds=1) for mode in ("sampled", "full")]
    header, _, line = _metric_table(spec, rows, "all")
    assert header.startswith("| Backbone | Method | window | loss |")
    assert line.startswith("| sasrec | None | sliding | ce |")


def test_a_partial_grid_says_its_best_baseline_is_the_best_of_the_finished_ones():
    """A grid part-way through compares the proposed method with the best *finished* baseline; the report must
    say so and name the baselines still missing, or a `*` reads as a win over baselines never run."""
    spec = load_experiment(CONFIGS / "experiments" / "table2_strong.toml")

    def compared(backbone: str, baseline: str) -> Row:
        return Row(backbone, "DMESR", "hit@10", "sampled", 0.75, 0.0, None, p_value=0.01, n_seeds=1,
                   best_baseline=baseline, test_seeds=[42], n_users=610, p_value_wilcoxon=0.02,
                   diff_vs_baseline=0.05, diff_ci95_low=0.02, diff_ci95_high=0.08, min_detectable_diff=0.03)

    def plain(backbone: str, method: str) -> Row:
        return Row(backbone, method, "hit@10", "sampled", 0.7, 0.0, None, n_seeds=1)

    all_baselines = ["None", "CPMM+ID", "QARM+ID", "X-REFLECT+ID"]
    rows = [compared("sasrec", "X-REFLECT+ID"), *(plain("sasrec", m) for m in all_baselines),
            compared("bert4rec", "None"), plain("bert4rec", "None"), plain("bert4rec", "QARM+ID")]
    table = "\n".join(_significance_table(spec, rows, ["all"]))
    assert "| BERT4Rec | all | H@10 s100 | None (of the finished) | 42 |" in table
    assert "| SASRec | all | H@10 s100 | X-REFLECT+ID | 42 |" in table
    assert ("BERT4Rec: the best baseline is the best of the finished ones only; not finished on this backbone: "
            "CPMM+ID, X-REFLECT+ID.") in table
    assert "SASRec: the best baseline" not in table
    # The paper-form reference row is not a baseline: its absence is not reported.
    assert "DMESR (paper form)" not in table
