"""SQLite (WAL) cache of generations, embeddings and image analyses, plus per-derivation progress.

Every answer is committed as it arrives (one short transaction per answer), so a derivation killed at any
moment (``kill -9`` included) loses at most the calls that were in flight; a rerun finds every finished
answer here and asks the model only for the rest. WAL mode lets ``prismrec semantics status`` read while a
derivation writes. Tables:

- ``generations``: key = hash of (backend, model, template name+version, rendered conversation, image
  content hashes, generation parameters) -> text, token counts, latency, time.
- ``embeddings``: key = (embedder, model, sha256 of the text) -> float32 vector (never normalised here;
  normalisation is applied when the artefact is written and recorded there).
- ``image_analyses``: (analyser model, image sha256) -> JSON analysis and the image feature vector.
- ``derivations`` / ``item_results``: per named derivation, the outcome of every (route, item): ok with
  its final text, or failed with the reason; ``semantics status`` reads these.

Vectors are stored as raw little-endian float32 bytes (no pickle anywhere).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prismrec.semantics.types import Generation

SCHEMA = """
CREATE TABLE IF NOT EXISTS generations (
    key TEXT PRIMARY KEY,
    backend TEXT NOT NULL,
    model TEXT NOT NULL,
    template TEXT NOT NULL,
    route TEXT NOT NULL,
    item TEXT NOT NULL,
    turn INTEGER NOT NULL,
    text TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    latency_s REAL NOT NULL,
    finish_reason TEXT,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS embeddings (
    embedder TEXT NOT NULL,
    model TEXT NOT NULL,
    text_sha TEXT NOT NULL,
    dim INTEGER NOT NULL,
    vector BLOB NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (embedder, model, text_sha)
);
CREATE TABLE IF NOT EXISTS image_analyses (
    model TEXT NOT NULL,
    image_sha TEXT NOT NULL,
    analysis TEXT NOT NULL,
    features BLOB,
    created_at REAL NOT NULL,
    PRIMARY KEY (model, image_sha)
);
CREATE TABLE IF NOT EXISTS derivations (
    name TEXT PRIMARY KEY,
    dataset TEXT NOT NULL,
    n_items INTEGER NOT NULL,
    config TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS derivation_runs (
    name TEXT NOT NULL,
    finished_at REAL NOT NULL,
    wall_s REAL NOT NULL,
    model_calls INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    written INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS failed_requests (
    key TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    reason TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS notes (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS item_results (
    name TEXT NOT NULL,
    route TEXT NOT NULL,
    item_id INTEGER NOT NULL,
    external_id TEXT NOT NULL,
    status TEXT NOT NULL,
    text TEXT,
    fallback TEXT,
    rounds INTEGER NOT NULL,
    template TEXT NOT NULL,
    error TEXT,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (name, route, item_id)
);
"""


@dataclass(frozen=True)
class ItemResult:
    """Outcome of one (route, item) in a named derivation."""

    route: str
    item_id: int
    external_id: str
    status: str  # "ok" | "failed"
    text: str | None
    fallback: str | None  # "no_image" when the visual/hybrid route used the text-only prompt
    rounds: int
    template: str
    error: str | None
    prompt_tokens: int
    completion_tokens: int


class SemanticCache:
    """One SQLite file; safe to share between derivations (keys include everything that changes answers)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Used from the event loop and from worker threads (CPU-bound backends): one lock serialises access.
        self._conn = sqlite3.connect(self.path, timeout=60.0, isolation_level=None, check_same_thread=False)
        self._lock = threading.RLock()
        self._conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode survives a killed process (only a power cut can drop the last commits).
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.executescript(SCHEMA)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> SemanticCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _query(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    # --- generations ---------------------------------------------------------------------------------
    def get_generation(self, key: str) -> Generation | None:
        rows = self._query(
            "SELECT text, prompt_tokens, completion_tokens, latency_s, finish_reason FROM generations WHERE key = ?",
            (key,),
        )
        if not rows:
            return None
        row = rows[0]
        return Generation(text=row[0], prompt_tokens=row[1], completion_tokens=row[2], latency_s=row[3],
                          finish_reason=row[4], cached=True)

    def put_generation(self, key: str, *, backend: str, model: str, template: str, route: str, item: str,
                       turn: int, generation: Generation) -> None:
        with self._transaction() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO generations VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (key, backend, model, template, route, item, turn, generation.text, generation.prompt_tokens,
                 generation.completion_tokens, generation.latency_s, generation.finish_reason, time.time()),
            )

    def count_generations(self) -> int:
        return int(self._query("SELECT COUNT(*) FROM generations")[0][0])

    # --- embeddings ----------------------------------------------------------------------------------
    def get_embeddings(self, embedder: str, model: str, text_shas: Iterable[str]) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        shas = list(dict.fromkeys(text_shas))
        for start in range(0, len(shas), 500):
            chunk = shas[start:start + 500]
            marks = ",".join("?" * len(chunk))
            for sha, dim, blob in self._query(
                f"SELECT text_sha, dim, vector FROM embeddings WHERE embedder = ? AND model = ? "
                f"AND text_sha IN ({marks})",
                (embedder, model, *chunk),
            ):
                vector = np.frombuffer(blob, dtype="<f4")
                if vector.shape[0] == dim:
                    found[sha] = vector
        return found

    def put_embeddings(self, embedder: str, model: str, vectors: dict[str, np.ndarray]) -> None:
        now = time.time()
        rows = [(embedder, model, sha, int(v.shape[0]), np.asarray(v, dtype="<f4").tobytes(), now)
                for sha, v in vectors.items()]
        with self._transaction() as conn:
            conn.executemany("INSERT OR REPLACE INTO embeddings VALUES (?,?,?,?,?,?)", rows)

    # --- image analyses ------------------------------------------------------------------------------
    def get_image_analyses(self, model: str, image_shas: Iterable[str]) -> dict[str, tuple[dict, np.ndarray | None]]:
        found: dict[str, tuple[dict, np.ndarray | None]] = {}
        shas = list(dict.fromkeys(image_shas))
        for start in range(0, len(shas), 500):
            chunk = shas[start:start + 500]
            marks = ",".join("?" * len(chunk))
            for sha, analysis, blob in self._query(
                f"SELECT image_sha, analysis, features FROM image_analyses WHERE model = ? AND image_sha IN ({marks})",
                (model, *chunk),
            ):
                features = None if blob is None else np.frombuffer(blob, dtype="<f4")
                found[sha] = (json.loads(analysis), features)
        return found

    def put_image_analyses(self, model: str, analyses: dict[str, tuple[dict, np.ndarray | None]]) -> None:
        now = time.time()
        rows = [(model, sha, json.dumps(analysis, sort_keys=True),
                 None if features is None else np.asarray(features, dtype="<f4").tobytes(), now)
                for sha, (analysis, features) in analyses.items()]
        with self._transaction() as conn:
            conn.executemany("INSERT OR REPLACE INTO image_analyses VALUES (?,?,?,?,?)", rows)

    # --- derivation progress -------------------------------------------------------------------------
    def start_derivation(self, name: str, dataset: str, n_items: int, config: dict) -> None:
        now = time.time()
        with self._transaction() as conn:
            conn.execute(
                "INSERT INTO derivations VALUES (?,?,?,?,?,?) ON CONFLICT(name) DO UPDATE SET "
                "dataset = excluded.dataset, n_items = excluded.n_items, config = excluded.config, "
                "updated_at = excluded.updated_at",
                (name, dataset, n_items, json.dumps(config, sort_keys=True), now, now),
            )

    def derivation(self, name: str) -> dict | None:
        rows = self._query("SELECT dataset, n_items, config, created_at, updated_at FROM derivations WHERE name = ?",
                           (name,))
        if not rows:
            return None
        row = rows[0]
        return {"dataset": row[0], "n_items": row[1], "config": json.loads(row[2]), "created_at": row[3],
                "updated_at": row[4]}

    def derivation_names(self) -> list[str]:
        return [r[0] for r in self._query("SELECT name FROM derivations ORDER BY name")]

    def record_run(self, name: str, *, wall_s: float, model_calls: int, prompt_tokens: int, completion_tokens: int,
                   written: bool) -> None:
        """One finished ``derive`` run of ``name``: wall time, model calls and the tokens of fresh answers."""
        with self._transaction() as conn:
            conn.execute("INSERT INTO derivation_runs VALUES (?,?,?,?,?,?,?)",
                         (name, time.time(), wall_s, model_calls, prompt_tokens, completion_tokens, int(written)))

    def runs(self, name: str) -> list[dict]:
        rows = self._query("SELECT finished_at, wall_s, model_calls, prompt_tokens, completion_tokens, written "
                           "FROM derivation_runs WHERE name = ? ORDER BY finished_at", (name,))
        keys = ("finished_at", "wall_s", "model_calls", "prompt_tokens", "completion_tokens", "written")
        return [dict(zip(keys, row, strict=True)) for row in rows]

    def get_failed_request(self, key: str) -> tuple[str, str] | None:
        """(kind, reason) of a request that failed in a way the same request always will, or None."""
        rows = self._query("SELECT kind, reason FROM failed_requests WHERE key = ?", (key,))
        return (rows[0][0], rows[0][1]) if rows else None

    def put_failed_request(self, key: str, kind: str, reason: str) -> None:
        with self._transaction() as conn:
            conn.execute("INSERT OR REPLACE INTO failed_requests VALUES (?,?,?,?)", (key, kind, reason, time.time()))

    def get_note(self, key: str) -> str | None:
        """A small fact learnt about a server or model (e.g. that it refuses images), kept across runs."""
        rows = self._query("SELECT value FROM notes WHERE key = ?", (key,))
        return rows[0][0] if rows else None

    def put_note(self, key: str, value: str) -> None:
        with self._transaction() as conn:
            conn.execute("INSERT OR REPLACE INTO notes VALUES (?,?,?)", (key, value, time.time()))

    def put_item_results(self, name: str, results: Iterable[ItemResult]) -> None:
        """Record outcomes (one transaction; the answers themselves were committed as they arrived)."""
        now = time.time()
        rows = [(name, r.route, r.item_id, r.external_id, r.status, r.text, r.fallback, r.rounds, r.template, r.error,
                 r.prompt_tokens, r.completion_tokens, now) for r in results]
        with self._transaction() as conn:
            conn.executemany("INSERT OR REPLACE INTO item_results VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", rows)

    def item_results(self, name: str, route: str | None = None) -> list[ItemResult]:
        query = ("SELECT route, item_id, external_id, status, text, fallback, rounds, template, error, prompt_tokens, "
                 "completion_tokens FROM item_results WHERE name = ?")
        params: tuple = (name,)
        if route is not None:
            query += " AND route = ?"
            params = (name, route)
        return [ItemResult(*row) for row in self._query(query + " ORDER BY route, item_id", params)]
