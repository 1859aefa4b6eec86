"""The committed experiment cell records stay valid: their configs validate, and hash to what they recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prismrec.training.runs import load_run_config

CELLS = Path(__file__).resolve().parents[1] / "reports" / "movielens" / "cells"
RECORDS = sorted(path for path in CELLS.glob("*") if (path / "cell.json").is_file())


def test_the_records_are_there() -> None:
    assert len(RECORDS) >= 60


@pytest.mark.parametrize("record", RECORDS, ids=[path.name for path in RECORDS])
def test_record_config_hash_is_recomputed_exactly(record: Path) -> None:
    config = load_run_config(record)
    cell = json.loads((record / "cell.json").read_text())
    meta = json.loads((record / "meta.json").read_text())
    assert config.config_hash() == cell["config_hash"] == meta["config_hash"]
    assert record.name.endswith(f"-{cell['config_hash']}")
    assert config.seed == cell["seed"]
