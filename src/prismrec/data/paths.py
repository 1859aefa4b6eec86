"""Where data is read from and where outputs go.

Data directory resolution (first that has the dataset wins):
1. ``--data-dir D`` given on the command line,
2. the ``PRISMREC_DATA_DIR`` environment variable,
3. ``../shared/data`` relative to the repository checkout (the project's embedded default).

Every output goes under ``$PRISMREC_HOME`` (default: the current directory) in ``runs/``,
``semantics/``, ``reports/`` and ``cache/``; nothing is ever written next to the data.
"""

from __future__ import annotations

import os
from pathlib import Path

from prismrec.data.errors import DataError, DatasetNotFoundError

REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def candidate_data_dirs(data_dir: Path | str | None = None) -> list[tuple[str, Path]]:
    """The places searched for datasets, in priority order, with where each came from."""
    places: list[tuple[str, Path]] = []
    if data_dir is not None:
        places.append(("--data-dir", Path(data_dir).expanduser()))
    env = os.environ.get("PRISMREC_DATA_DIR")
    if env:
        places.append(("PRISMREC_DATA_DIR", Path(env).expanduser()))
    places.append(("default", DEFAULT_SHARED_DATA))
    return places


def resolve_dataset_root(dataset: str, data_dir: Path | str | None = None) -> Path:
    """Return the folder holding ``dataset``; a helpful error if none of the places has it."""
    places = candidate_data_dirs(data_dir)
    if data_dir is not None:
        # An explicit --data-dir is the user's word: do not silently fall back past it.
        places = places[:1]
    for _, place in places:
        root = place / dataset
        if root.is_dir():
            return root.resolve()
    looked = "\n".join(f"  - {place / dataset}  (from {origin})" for origin, place in places)
    raise DatasetNotFoundError(
        f"dataset {dataset!r} not found. Looked in:\n{looked}\n"
        f"Point at a copy with `--data-dir DIR` (DIR/{dataset}/ must exist) or set PRISMREC_DATA_DIR, "
        f"or download the public release with `prismrec data download {dataset} --data-dir DIR`."
    )


def safe_join(root: Path, relative: str | Path, *, source: Path | None = None, line: int | None = None) -> Path:
    """Join a path taken from a data file onto its dataset root, refusing anything that escapes it.

    Absolute paths, ``..`` components and symlinks that lead outside ``root`` are all rejected.
    """
    root = Path(root).resolve()
    rel = Path(relative)
    if rel.is_absolute():
        raise DataError(f"path {str(relative)!r} is absolute; data paths must stay inside {root}", source, line)
    candidate = (root / rel).resolve()
    if candidate != root and root not in candidate.parents:
        raise DataError(f"path {str(relative)!r} leads outside the dataset root {root}", source, line)
    return candidate


def prismrec_home() -> Path:
    """Root for everything prismrec writes (runs/, semantics/, reports/, cache/)."""
    return Path(os.environ.get("PRISMREC_HOME", ".")).expanduser().resolve()


def output_dir(kind: str) -> Path:
    """``$PRISMREC_HOME/<kind>``, created on demand."""
    path = prismrec_home() / kind
    path.mkdir(parents=True, exist_ok=True)
    return path
