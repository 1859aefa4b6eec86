"""Shared fixtures. Every test writes under a temporary PRISMREC_HOME, never into the repository."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
_HOME = tempfile.mkdtemp(prefix="prismrec-test-home-")
os.environ["PRISMREC_HOME"] = _HOME
os.environ.pop("PRISMREC_DATA_DIR", None)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def movielens_sequences():
    from prismrec.data import load_sequences

    if not (SHARED_DATA / "movielens-small").is_dir():
        pytest.skip("../shared/data/movielens-small is not present")
    return load_sequences("movielens-small")


@pytest.fixture(scope="session")
def movielens_split(movielens_sequences):
    from prismrec.data.split import LeaveOneOutSplit

    return LeaveOneOutSplit(movielens_sequences)


def write_movielens(root: Path, ratings: str, movies: str | None = None) -> Path:
    """A tiny MovieLens-format folder for bad-input and unit tests."""
    folder = root / "movielens-small"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ratings.csv").write_text(ratings, encoding="utf-8")
    if movies is None:
        movies = "movieId,title,genres\n" + "".join(f"{i},Movie {i} (2000),Drama\n" for i in range(1, 40))
    (folder / "movies.csv").write_text(movies, encoding="utf-8")
    return folder


def write_walk_movielens(root: Path, users: int, movies: int, steps: int = 14) -> Path:
    """Users walking through ``movies`` movies in order, each from its own start: the next item is learnable."""
    rows = ["userId,movieId,rating,timestamp"]
    for user in range(1, users + 1):
        for step in range(steps):
            rows.append(f"{user},{(user * 7 + step) % movies + 1},4,{1000 + 10 * step}")
    return write_movielens(root, "\n".join(rows) + "\n")
