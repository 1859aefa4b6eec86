"""``prismrec derive --backend openai`` against a real llama.cpp ``llama-server`` serving SmolLM2-135M (text-only).

Opt-in (``pytest -m real_server``; skipped with the reason when ``make llama-server`` / ``make llm`` were not run,
as in CI): 20 MovieLens items, all three routes, a ``kill -9`` in the middle and a resume. The server refuses
images, so ``--image-input auto`` must switch to the poster analysis after one refusal and finish every item.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from llama_server import missing, serving

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
PRISMREC = REPO / ".venv" / "bin" / "prismrec"

pytestmark = [pytest.mark.real_server,
              pytest.mark.skipif(missing() is not None, reason=str(missing())),
              pytest.mark.skipif(not (DATA / "movielens-small").is_dir(), reason=f"no MovieLens under {DATA}")]


def _answers(cache: Path) -> int:
    if not cache.exists():
        return 0
    with sqlite3.connect(cache) as conn:
        try:
            return int(conn.execute("SELECT COUNT(*) FROM generations").fetchone()[0])
        except sqlite3.OperationalError:  # tables not created yet
            return 0


def _model_calls(output: str) -> int:
    match = re.search(r"model calls: ([\d,]+)", output)
    assert match, output
    return int(match.group(1).replace(",", ""))


def test_derive_against_llama_server_survives_kill_9_and_resumes(tmp_path: Path) -> None:
    cache = tmp_path / "semantics.sqlite"
    env = {**os.environ, "PRISMREC_HOME": str(tmp_path / "home"), "OMP_WAIT_POLICY": "PASSIVE",
           "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    with serving(slots=4, log=tmp_path / "llama-server.log") as url:
        command = [str(PRISMREC), "derive", "movielens-small", "--data-dir", str(DATA), "--limit", "20",
                   "--backend", "openai", "--base-url", url, "--model", "smollm2-135m-instruct", "--concurrency", "4",
                   "--max-tokens", "160", "--max-retries", "2", "--cache", str(cache), "--name", "real",
                   "--allow-fallback", "original"]
        first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 600
        while _answers(cache) < 12 and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert first.poll() is None, "the first run ended before it could be killed"
        first.send_signal(signal.SIGKILL)
        said_first = first.communicate()[0]
        kept = _answers(cache)
        assert kept >= 12
        assert said_first.count("does not take images") == 1  # one refusal, then the poster analysis

        resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        said = resumed.stdout + resumed.stderr
        assert resumed.returncode == 0, said
        assert "artefact:" in said and "earlier run" in said  # the refusal was remembered: no image is sent again
        # 20 textual + 20 visual + 20 hybrid answers at most (poster-less items reuse the textual one); the
        # answers committed before the kill were not asked again
        assert _model_calls(said) <= 60 - kept
        assert (tmp_path / "home" / "semantics" / "real" / "embeddings.safetensors").is_file()

        again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0 and _model_calls(again.stdout + again.stderr) == 0

    status = subprocess.run([str(PRISMREC), "semantics", "status", "real", "--cache", str(cache)], env=env,
                            capture_output=True, text=True, timeout=60)
    said = " ".join(status.stdout.split())
    assert status.returncode == 0 and "run(s): wall time" in said and "completion tokens/s" in said
