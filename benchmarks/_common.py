"""Helpers shared by the benchmark scripts: results files and the exact command line."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def command_line() -> str:
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(Path.cwd())
    except ValueError:
        pass
    return " ".join(shlex.quote(a) for a in [".venv/bin/python", str(script), *sys.argv[1:]])


def write_results(name: str, flat: dict[str, Any], table_md: str, notes: str = "") -> None:
    """Write ``results/NAME.json`` (flat keys) and ``results/NAME.md`` (table + the exact command)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(flat, indent=2, sort_keys=True) + "\n")
    body = f"# {name}\n\nCommand:\n\n```bash\n{command_line()}\n```\n\n{table_md.strip()}\n"
    if notes:
        body += f"\n{notes.strip()}\n"
    (RESULTS / f"{name}.md").write_text(body)
