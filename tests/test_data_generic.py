"""The generic CSV/Parquet format: counts, attributes, images, duplicates and bad input."""

from __future__ import annotations

import random
import re
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from prismrec.cli.app import app
from prismrec.data import DataError, build_sequences
from prismrec.data.generic import GenericDataset, GenericOptions
from prismrec.data.images import ImageCache
from test_data_amazon import kcore_counts, table_numbers

DOCS = Path(__file__).resolve().parents[1] / "docs" / "datasets.md"


def make_interactions(seed: int = 3, n: int = 300) -> list[tuple[str, str, int]]:
    rng = random.Random(seed)
    rows = [(f"u{rng.choices(range(40), [1 / (k + 1) ** 0.6 for k in range(40)])[0]}",
             f"i{rng.choices(range(30), [1 / (k + 1) ** 0.8 for k in range(30)])[0]}",
             1_600_000_000 + rng.randrange(10**7)) for _ in range(n)]
    return rows + rows[:4]  # exact duplicates


def write_shop(root: Path, rows: list[tuple[str, str, int]], parquet: bool = False, unit: str = "s") -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(exist_ok=True)
    (root / "images" / "i0.jpg").write_bytes(b"\xff\xd8fake")
    if unit == "ms":
        stamps = [t * 1000 + 999 for _, _, t in rows]
    elif unit == "iso":
        stamps = [datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ") for _, _, t in rows]
    else:
        stamps = [t for _, _, t in rows]
    inter = pd.DataFrame({"who": [u for u, _, _ in rows], "what": [i for _, i, _ in rows], "when": stamps})
    items = pd.DataFrame({
        "item": [f"i{k}" for k in range(28)] + ["i3"],  # i28, i29 undescribed; i3 twice
        "genre": ["kitchen"] * 29,
        "title": [f"Thing {k}" for k in range(28)] + ["Second i3"],
        "picture": ["images/i0.jpg", "images/missing.jpg", "https://img.example/i2.jpg"] + [""] * 26,
    })
    if parquet:
        inter.to_parquet(root / "interactions.parquet")
        items.to_parquet(root / "items.parquet")
    else:
        inter.to_csv(root / "interactions.csv", index=False)
        items.to_csv(root / "items.csv", index=False)


def options(parquet: bool = False, **extra: object) -> GenericOptions:
    ext = "parquet" if parquet else "csv"
    return GenericOptions(interactions_file=f"interactions.{ext}", items_file=f"items.{ext}", user_column="who",
                          item_column="what", timestamp_column="when", image_column="picture", **extra)


def expected(rows: list[tuple[str, str, int]], min_user: int, min_item: int) -> tuple[int, int, int]:
    unique = list(dict.fromkeys(rows))
    described = {f"i{k}" for k in range(28)}
    return kcore_counts([(u, i) for u, i, _ in unique if i in described], min_user, min_item)


@pytest.mark.parametrize(("parquet", "unit"), [(False, "s"), (True, "s"), (False, "ms"), (False, "iso"),
                                               (True, "ms")])
def test_counts_attributes_images(tmp_path: Path, parquet: bool, unit: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRISMREC_HOME", str(tmp_path / "home"))
    rows = make_interactions()
    root = tmp_path / "shop"
    write_shop(root, rows, parquet, unit)
    cached = ImageCache().store("https://img.example/i2.jpg", b"x", "jpg")
    loader = GenericDataset(options(parquet, timestamp_unit=unit))
    raw = loader.load(root)
    assert loader.report.duplicate_interactions == 4 and loader.report.duplicate_items == 1
    assert raw.attribute_columns == ["title", "genre"]
    assert list(raw.interactions["timestamp"]) == [t for _, _, t in dict.fromkeys(rows)]
    items = raw.items.set_index("item")
    assert items.loc["i3", "title"] == "Thing 3"  # first row kept
    assert items.loc["i0", "image_path"] == (root / "images" / "i0.jpg").resolve()
    assert items.loc["i1", "image_path"] is None and loader.report.missing_images == 1
    assert items.loc["i2", "image_path"] == cached and items.loc["i2", "image_url"] == "https://img.example/i2.jpg"
    for min_user, min_item in ((1, 1), (3, 2)):
        seqs = build_sequences(raw, min_user, min_item)
        assert (seqs.n_users, seqs.n_items, seqs.n_interactions) == expected(rows, min_user, min_item)


def test_cli_with_folder_and_options(tmp_path: Path) -> None:
    rows = make_interactions()
    write_shop(tmp_path / "my-shop", rows)
    args = ["data", "stats", "generic", "--data-dir", str(tmp_path), "--folder", "my-shop",
            "-o", "user_column=who", "-o", "item_column=what", "-o", "timestamp_column=when",
            "-o", "image_column=picture", "-o", 'attribute_columns=["title"]',
            "--min-user-interactions", "3", "--min-item-interactions", "2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert table_numbers(result.output) == expected(rows, 3, 2)
    bad = CliRunner().invoke(app, [*args[:7], "-o", "colour=blue"])
    assert bad.exit_code == 2 and "colour" in bad.output and "Extra inputs are not permitted" in bad.output


def test_docs_example_loads(tmp_path: Path) -> None:
    """The ten-line example in docs/datasets.md is a working dataset."""
    block = re.search(r"```text\n(.*?)```", DOCS.read_text("utf-8"), re.S)
    assert block is not None
    lines = block.group(1).splitlines()
    assert len(lines) == 10
    root = tmp_path / "my-shop"
    root.mkdir()
    files: dict[str, list[str]] = {}
    for line in lines:
        if line.startswith("# "):
            current = files.setdefault(line[2:].strip(), [])
        else:
            current.append(line)
    for name, content in files.items():
        (root / name).write_text("\n".join(content) + "\n", "utf-8")
    (root / "images").mkdir()
    (root / "images" / "mug.jpg").write_bytes(b"\xff\xd8fake")
    raw = GenericDataset().load(root)
    seqs = build_sequences(raw)
    assert (seqs.n_users, seqs.n_items, seqs.n_interactions) == (2, 2, 4)
    assert raw.attribute_columns == ["title", "description"]
    assert seqs.item_attributes(1) == {"title": "Blue mug", "description": "Stoneware mug 350 ml"}


def test_bad_input_names_file_and_line(tmp_path: Path) -> None:
    root = tmp_path / "shop"
    write_shop(root, make_interactions())
    items = pd.read_csv(root / "items.csv", dtype=str, keep_default_na=False)

    items.loc[5, "picture"] = "../../secret.jpg"
    items.to_csv(root / "items.csv", index=False)
    with pytest.raises(DataError, match="leads outside the dataset root") as info:
        GenericDataset(options()).load(root)
    assert info.value.line == 7 and info.value.path == (root / "items.csv").resolve()

    items.loc[5, "picture"] = "file:///etc/passwd"
    items.to_csv(root / "items.csv", index=False)
    with pytest.raises(DataError, match="'file' scheme") as info:
        GenericDataset(options()).load(root)
    assert info.value.line == 7

    inter = (root / "interactions.csv").read_text().splitlines()
    inter[9] = "u1,i1,not-a-time"
    (root / "interactions.csv").write_text("\n".join(inter) + "\n")
    with pytest.raises(DataError, match="must be an integer") as info:
        GenericDataset(options()).load(root)
    assert info.value.line == 10
    with pytest.raises(DataError, match="not an ISO 8601") as info:
        GenericDataset(options(timestamp_unit="iso")).load(root)
    assert info.value.line == 2  # integers are not ISO dates either: the first row is reported

    with pytest.raises(DataError, match="missing column"):
        GenericDataset(GenericOptions()).load(root)  # default column names: user/item/timestamp are absent
    with pytest.raises(DataError, match="file not found"):
        GenericDataset(GenericOptions(interactions_file="nope.parquet")).load(root)
    with pytest.raises(DataError, match="outside the dataset root"):
        GenericDataset(GenericOptions(items_file="../items.csv")).load(root)


def test_parquet_datetime_timestamps(tmp_path: Path) -> None:
    root = tmp_path / "shop"
    root.mkdir()
    when = pd.to_datetime(["2024-05-01T12:00:00Z", "2024-05-02T12:00:00Z"])
    pd.DataFrame({"user": ["u1", "u1"], "item": ["a", "b"], "timestamp": when}).to_parquet(root / "inter.parquet")
    pd.DataFrame({"item": ["a", "b"], "title": ["A", "B"]}).to_parquet(root / "items.parquet")
    files = {"interactions_file": "inter.parquet", "items_file": "items.parquet"}
    with pytest.raises(DataError, match="use timestamp_unit=iso"):
        GenericDataset(GenericOptions(**files)).load(root)
    raw = GenericDataset(GenericOptions(**files, timestamp_unit="iso")).load(root)
    assert list(raw.interactions["timestamp"]) == [1714564800, 1714651200]
