"""``prismrec derive`` / ``prismrec semantics`` on the command line, and kill -9 resume with a real subprocess."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fake_openai_server import FakeOpenAIServer
from prismrec.cli.app import app
from prismrec.semantics import load_artefact
from semantics_helpers import make_tiny_movielens

runner = CliRunner()


@pytest.fixture()
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.setenv("PRISMREC_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("COLUMNS", "200")
    make_tiny_movielens(tmp_path / "data")
    return {"data": str(tmp_path / "data"), "cache": str(tmp_path / "cache.sqlite")}


def test_cli_derive_describe_status_show(env: dict[str, str]) -> None:
    result = runner.invoke(app, ["derive", "movielens-small", "--data-dir", env["data"], "--limit", "3",
                                 "--cache", env["cache"]])
    assert result.exit_code == 0, result.output
    assert "movielens-small-describe-limit3" in result.output and "artefact:" in result.output
    status = runner.invoke(app, ["semantics", "status", "movielens-small-describe-limit3", "--cache", env["cache"]])
    assert status.exit_code == 0, status.output
    assert "textual" in status.output and "hybrid" in status.output
    show = runner.invoke(app, ["semantics", "show", "movielens-small-describe-limit3", "1", "--cache", env["cache"]])
    assert show.exit_code == 0, show.output
    assert "title: Toy Story" in show.output and "ImageNet categories" in show.output
    by_external = runner.invoke(app, ["semantics", "show", "movielens-small-describe-limit3", "1", "--external",
                                      "--cache", env["cache"]])
    assert by_external.exit_code == 0 and "Toy Story" in by_external.output
    missing = runner.invoke(app, ["semantics", "show", "movielens-small-describe-limit3", "99", "--cache",
                                  env["cache"]])
    assert missing.exit_code == 2
    unknown = runner.invoke(app, ["semantics", "status", "nope", "--cache", env["cache"]])
    assert unknown.exit_code == 2 and "movielens-small-describe-limit3" in unknown.output


def test_cli_derive_applies_the_training_filter(env: dict[str, str]) -> None:
    """Artefact rows follow internal item ids, so derive must filter the catalogue as the training config does."""
    from prismrec.data import load_sequences

    # One movie rated by a single user: a min-item-interactions=2 filter drops exactly it.
    ratings = Path(env["data"]) / "movielens-small" / "ratings.csv"
    header, *rows = ratings.read_text().splitlines()
    rare = rows[-1].split(",")[1]
    rows = [r for r in rows if r.split(",")[1] != rare or r.split(",")[0] == "1"]
    ratings.write_text("\n".join([header, *rows]) + "\n")
    unfiltered = load_sequences("movielens-small", Path(env["data"]))
    filtered = load_sequences("movielens-small", Path(env["data"]), min_item_interactions=2)
    assert filtered.n_items == unfiltered.n_items - 1 and rare not in set(filtered.item_ids)
    result = runner.invoke(app, ["derive", "movielens-small", "--data-dir", env["data"], "--min-item-interactions",
                                 "2", "--name", "filtered", "--cache", env["cache"]])
    assert result.exit_code == 0, result.output
    artefact = load_artefact("filtered")
    artefact.check_matches(filtered.item_ids)
    assert artefact.matrices["text"].shape[0] == filtered.n_items + 1


def test_cli_rejects_options_a_backend_does_not_take(env: dict[str, str]) -> None:
    result = runner.invoke(app, ["derive", "movielens-small", "--data-dir", env["data"], "--base-url",
                                 "http://127.0.0.1:1/v1", "--cache", env["cache"]])
    assert result.exit_code == 2
    assert "--base-url does not apply to backend 'describe'" in result.output
    unknown = runner.invoke(app, ["derive", "movielens-small", "--backend", "gpt5", "--cache", env["cache"]])
    assert unknown.exit_code == 2 and "known: describe" in unknown.output


def test_cli_failures_exit_non_zero_unless_fallback_allowed(env: dict[str, str]) -> None:
    with FakeOpenAIServer() as server:
        server.add_fault("503", match="attributes: title: Jumanji", times=-1)
        common = ["derive", "movielens-small", "--data-dir", env["data"], "--backend", "openai", "--base-url",
                  server.url, "--model", "fake", "--embedder", "openai", "--embedder-base-url", server.url,
                  "--max-retries", "1", "--name", "cli-fail", "--cache", env["cache"]]
        failed = runner.invoke(app, common)
        assert failed.exit_code == 1, failed.output
        assert "1 failed" in failed.output and "HTTP 503" in failed.output and "no artefact written" in failed.output
        fallback = runner.invoke(app, [*common, "--allow-fallback", "original"])
        assert fallback.exit_code == 0, fallback.output
    assert load_artefact("cli-fail").manifest["counts"]["textual"]["fallback_original"] == 1


def _generation_count(cache: Path) -> int:
    with sqlite3.connect(cache) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM generations").fetchone()[0])


def test_kill_9_then_resume_requests_nothing_twice(env: dict[str, str], tmp_path: Path) -> None:
    """A real ``prismrec derive`` subprocess is SIGKILLed mid-run; the rerun asks only for what is missing."""
    with FakeOpenAIServer(latency_s=0.15) as server:
        command = [sys.executable, "-m", "prismrec", "derive", "movielens-small", "--data-dir", env["data"],
                   "--backend", "openai", "--base-url", server.url, "--model", "fake", "--concurrency", "2",
                   "--embedder", "openai", "--embedder-base-url", server.url, "--name", "resume",
                   "--cache", env["cache"]]
        child_env = {**os.environ, "PRISMREC_HOME": os.environ["PRISMREC_HOME"]}
        child = subprocess.Popen(command, env=child_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while server.counts["/v1/chat/completions"] < 10 and time.monotonic() < deadline and child.poll() is None:
            time.sleep(0.02)
        assert child.poll() is None, child.stderr.read().decode() if child.stderr else ""
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
        assert child.returncode == -signal.SIGKILL

        with sqlite3.connect(env["cache"]) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        finished = _generation_count(Path(env["cache"]))
        assert 0 < finished < 32
        assert not (Path(os.environ["PRISMREC_HOME"]) / "semantics" / "resume" / "items.json").exists()

        server.reset_counts()
        rerun = subprocess.run(command, env=child_env, capture_output=True, timeout=300)
        assert rerun.returncode == 0, rerun.stderr.decode()[-2000:]
        total = _generation_count(Path(env["cache"]))
        assert total == 12 + 2 * 10  # textual for all, visual and hybrid for the items with posters
        # every request of the rerun produced a new answer: nothing finished was asked again
        assert server.counts["/v1/chat/completions"] == total - finished
        artefact = load_artefact("resume")
        assert artefact.matrices["hybrid"].shape[0] == 13

        server.reset_counts()
        third = subprocess.run(command, env=child_env, capture_output=True, timeout=300)
        assert third.returncode == 0, third.stderr.decode()[-2000:]
        assert server.counts["requests"] == 0  # a finished derivation makes zero model (and embedding) calls


def test_cli_derive_with_xreflect_describe(env: dict[str, str]) -> None:
    result = runner.invoke(app, ["derive", "movielens-small", "--data-dir", env["data"], "--limit", "3",
                                 "--with-xreflect", "--name", "xr3", "--cache", env["cache"]])
    assert result.exit_code == 0, result.output
    artefact = load_artefact("xr3")
    assert artefact.matrices["xreflect"].shape == artefact.matrices["hybrid"].shape == (4, 384)
    assert artefact.manifest["templates"]["xreflect"] == ["xreflect@v1"]  # all three items have posters
    table = artefact.descriptions()
    # describe: no MLLM, the attributes and the poster analysis side by side
    assert table["xreflect"].str.startswith("Text: title: ").all()
    assert table["xreflect"].str.contains("Poster analysis: ").all()
    assert table["xreflect"].str.contains("ImageNet categories").all()
    assert not np.allclose(artefact.matrices["xreflect"][1:], artefact.matrices["hybrid"][1:])
    status = runner.invoke(app, ["semantics", "status", "xr3", "--cache", env["cache"]])
    assert status.exit_code == 0 and "xreflect" in status.output
    show = runner.invoke(app, ["semantics", "show", "xr3", "1", "--cache", env["cache"]])
    assert show.exit_code == 0 and "template xreflect@v1" in show.output
