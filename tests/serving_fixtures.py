"""Tiny trained runs and their exports for the serving and explorer tests, built once per test process.

SASRec and DMESR (hidden 16, max_len 20, one epoch) on the real MovieLens data; DMESR reads a small
random semantics artefact (tests/semantics_fixtures.py) with a descriptions table, as `prismrec derive`
writes it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from prismrec.config import load_config
from prismrec.data.dataset import SequenceDataset
from prismrec.serving import export as _export  # noqa: F401  (registers the dmesr model)
from semantics_fixtures import write_artefact

TINY = ["model.hidden_size=16", "model.max_len=20", "model.num_blocks=1", "training.max_epochs=1",
        "training.batch_size=128", "evaluation.full_ranking=false", "model.dropout=0.0"]


@dataclass
class ServingRuns:
    root: Path
    dataset: SequenceDataset = field(repr=False)
    sasrec_run: Path
    dmesr_run: Path
    sasrec_export: Path
    dmesr_export: Path


_CACHE: dict[str, ServingRuns] = {}


def write_descriptions(folder: Path, dataset: SequenceDataset) -> None:
    """A descriptions.parquet in the layout `prismrec derive` writes (columns as in derive.write_artefact)."""
    rows = []
    for internal in range(1, dataset.n_items + 1):
        attrs = dataset.item_attributes(internal)
        title = attrs.get("title", "")
        original = "; ".join(f"{k}: {v}" for k, v in attrs.items())
        rows.append({"item_id": internal, "external_id": str(dataset.item_ids[internal]), "title": title,
                     "original": original, "textual": f"TEXTUAL view of {title}: {original}", "textual_status": "ok",
                     "visual": f"VISUAL view of {title}: a poster with dark colours", "visual_status": "ok",
                     "hybrid": f"HYBRID view of {title}", "hybrid_status": "ok", "hybrid_rounds": 0})
    pd.DataFrame(rows).to_parquet(folder / "descriptions.parquet", index=False)


def serving_runs() -> ServingRuns:
    if "runs" in _CACHE:
        return _CACHE["runs"]
    from prismrec.serving.export import export_run
    from prismrec.training import Trainer, prepare_split

    root = Path(tempfile.mkdtemp(prefix="prismrec-serving-"))
    sasrec_cfg = load_config(None, ["model.name='sasrec'", "name='srv-sasrec'", *TINY])
    split = prepare_split(sasrec_cfg)
    dataset = split.dataset
    Trainer(sasrec_cfg, split=split, run_dir=root / "run-sasrec", quiet=True).fit()

    artefact = write_artefact(root / "semantics" / "tiny", [str(i) for i in dataset.item_ids[1:]], dim=12)
    write_descriptions(artefact, dataset)
    manifest = json.loads((artefact / "items.json").read_text())  # provenance as `prismrec derive` records it
    manifest.update({"name": "tiny", "backend": {"backend": "test-fixture", "model": "random-embeddings"},
                     "embedder": {"embedder": "none", "model": "random-normal-12d"}})
    (artefact / "items.json").write_text(json.dumps(manifest))
    dmesr_cfg = load_config(None, ["model.name='dmesr'", f"model.semantics='{artefact}'", "name='srv-dmesr'",
                                   *TINY])
    Trainer(dmesr_cfg, split=split, run_dir=root / "run-dmesr", quiet=True).fit()
    runs = ServingRuns(root, dataset, root / "run-sasrec", root / "run-dmesr",
                       export_run(root / "run-sasrec", root / "export-sasrec"),
                       export_run(root / "run-dmesr", root / "export-dmesr"))
    _CACHE["runs"] = runs
    return runs


class LiveServer:
    """A real uvicorn server on 127.0.0.1 (free port) in a background thread."""

    def __init__(self, app) -> None:  # type: ignore[no-untyped-def]
        import socket
        import threading

        import uvicorn

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.app = app
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        import time

        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


SHARED_DATA_PRESENT = (Path(__file__).resolve().parents[1].parent / "shared" / "data" / "movielens-small").is_dir()


class ServeProcess:
    """`prismrec serve EXPORTS... ARGS` as a real subprocess on a free 127.0.0.1 port, up once /health answers."""

    def __init__(self, exports: list[Path], *args: str, startup_s: float = 180) -> None:
        import socket

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [sys.executable, "-m", "prismrec", "serve", *map(str, exports), "--port", str(self.port), *args]
        self.startup_s = startup_s
        self.process: subprocess.Popen | None = None
        self.log = Path(tempfile.mkstemp(prefix="prismrec-serve-", suffix=".log")[1])

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def __enter__(self) -> ServeProcess:
        import time

        import httpx

        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
        env.pop("PRISMREC_SERVE_TOKEN", None)
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(self.command, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.startup_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"prismrec serve exited with {self.process.returncode}: {self.output()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.process.kill()
                raise RuntimeError(f"prismrec serve did not answer /health in {self.startup_s} s: {self.output()}")
            time.sleep(0.2)

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, then wait; the exit status."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.stop()
        self.log.unlink(missing_ok=True)
