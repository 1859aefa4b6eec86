"""Run directories: everything needed to understand and repeat a run lives next to its results.

``runs/<name>-<timestamp>/`` holds ``config.toml`` (resolved), ``meta.json`` (seed, package versions,
data fingerprint, config hash, command line), ``metrics.jsonl`` (one line per epoch),
``model.safetensors`` (best checkpoint), ``last.safetensors`` (the resumable state after the latest epoch:
weights, optimizer, random generators, early stopping; no pickle) and ``final.json`` (metrics of the best
checkpoint).
"""

from __future__ import annotations

import json
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from prismrec.config import RunConfig, load_config
from prismrec.data.paths import output_dir
from prismrec.options import dump_toml

TRACKED_PACKAGES = ("prismrec", "torch", "numpy", "pandas", "pydantic", "safetensors", "sentence-transformers",
                    "transformers", "scipy")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def new_run_dir(name: str, root: Path | None = None) -> Path:
    root = root or output_dir("runs")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = root / f"{name}-{stamp}"
    suffix = 1
    while path.exists():
        suffix += 1
        path = root / f"{name}-{stamp}-{suffix}"
    path.mkdir(parents=True)
    return path


def write_json(path: Path, payload: Any) -> None:
    """Write JSON atomically (a killed process never leaves half a file)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)


def write_run_header(run_dir: Path, config: RunConfig, fingerprint: str, extra: dict[str, Any] | None = None) -> None:
    (run_dir / "config.toml").write_text(dump_toml(config.to_dict()), encoding="utf-8")
    meta = {
        "seed": config.seed,
        "negative_seed": config.evaluation.negative_seed,
        "config_hash": config.config_hash(),
        "data_fingerprint": fingerprint,
        "packages": package_versions(),
        "platform": platform.platform(),
        "command": sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **(extra or {}),
    }
    write_json(run_dir / "meta.json", meta)


def load_run_config(run_dir: Path) -> RunConfig:
    return load_config(Path(run_dir) / "config.toml")
