"""Amazon Reviews 2018/2023 loader on small fixtures written in the real formats (gzipped and plain)."""

from __future__ import annotations

import gzip
import json
import random
import re
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from prismrec.cli.app import app
from prismrec.data import DataError, build_sequences
from prismrec.data.amazon import AmazonGames, AmazonOptions, AmazonReviews
from prismrec.data.images import ImageCache

N_USERS, N_ITEMS, N_REVIEWS = 70, 45, 420


def kcore_counts(pairs: list[tuple[str, str]], min_user: int, min_item: int) -> tuple[int, int, int]:
    """Users, items, interactions left by iterated k-core filtering (plain Python, independent of the loader)."""
    kept = list(pairs)
    while True:
        item_counts = Counter(i for _, i in kept)
        step = [(u, i) for u, i in kept if item_counts[i] >= min_item]
        user_counts = Counter(u for u, _ in step)
        step = [(u, i) for u, i in step if user_counts[u] >= min_user]
        if len(step) == len(kept):
            break
        kept = step
    return len({u for u, _ in kept}), len({i for _, i in kept}), len(kept)


def make_reviews(seed: int) -> list[tuple[str, str, int]]:
    rng = random.Random(seed)
    users = [f"A{n:05d}XYZ" for n in range(N_USERS)]
    items = [f"B00{n:05d}" for n in range(N_ITEMS)]
    # Skewed popularity so the paper filter removes a real share of users and items.
    weights_u = [1.0 / (k + 1) ** 0.8 for k in range(N_USERS)]
    weights_i = [1.0 / (k + 1) ** 0.9 for k in range(N_ITEMS)]
    reviews = []
    for _ in range(N_REVIEWS):
        user = rng.choices(users, weights_u)[0]
        item = rng.choices(items, weights_i)[0]
        reviews.append((user, item, 1_300_000_000 + rng.randrange(0, 200_000_000)))
    return reviews


def review_line(release: str, user: str, item: str, ts: int) -> dict:
    if release == "2018":
        return {"overall": 4.0, "verified": True, "reviewTime": "01 1, 2015", "reviewerID": user, "asin": item,
                "reviewerName": "x", "reviewText": "fun", "summary": "ok", "unixReviewTime": ts}
    return {"rating": 4.0, "title": "ok", "text": "fun", "images": [], "asin": item, "parent_asin": item,
            "user_id": user, "timestamp": ts * 1000 + 123, "helpful_vote": 0, "verified_purchase": True}


def meta_line(release: str, item: str, n: int) -> dict:
    if release == "2018":
        return {"category": ["Video Games", "PC", "Games"], "description": [f"<b>Great</b> game number {n}"],
                "title": f"Game &amp; Title {n}", "brand": "Studio", "feature": ["fast", "fun"],
                "imageURL": [f"https://img.example/{item}._SS40_.jpg"],
                "imageURLHighRes": [f"https://img.example/{item}.jpg"], "asin": item}
    return {"main_category": "Video Games", "title": f"Game &amp; Title {n}", "features": ["fast", "fun"],
            "description": [f"<b>Great</b> game number {n}"], "store": "Studio",
            "categories": ["Video Games", "PC", "Games"], "details": {"Release date": "2015"},
            "images": [{"thumb": f"https://img.example/{item}_t.jpg", "large": f"https://img.example/{item}_l.jpg",
                        "variant": "PT01", "hi_res": None},
                       {"thumb": f"https://img.example/{item}_t0.jpg",
                        "large": f"https://img.example/{item}.jpg", "variant": "MAIN", "hi_res": None}],
            "parent_asin": item}


def write_lines(path: Path, rows: list[str], gz: bool) -> None:
    data = "".join(r + "\n" for r in rows).encode()
    path.write_bytes(gzip.compress(data) if gz else data)


def write_fixture(root: Path, release: str, gz: bool, seed: int = 0) -> tuple[list[tuple[str, str, int]], set[str]]:
    """Reviews with repeats of (user, item), metadata for all but two items and one repeated metadata line."""
    root.mkdir(parents=True, exist_ok=True)
    reviews = make_reviews(seed)
    ext = "json" if release == "2018" else "jsonl"
    suffix = ".gz" if gz else ""
    write_lines(root / f"Video_Games.{ext}{suffix}", [json.dumps(review_line(release, *r)) for r in reviews], gz)
    items = sorted({i for _, i, _ in reviews})
    described = set(items[2:])  # two reviewed items have no metadata
    meta = [json.dumps(meta_line(release, item, n)) for n, item in enumerate(sorted(described))]
    meta.append(meta[0])  # the dumps repeat metadata records
    write_lines(root / f"meta_Video_Games.{ext}{suffix}", meta, gz)
    return reviews, described


def expected(reviews: list[tuple[str, str, int]], described: set[str], min_user: int, min_item: int):
    seen: set[tuple[str, str]] = set()
    pairs = []
    for user, item, _ in reviews:
        if (user, item) not in seen:
            seen.add((user, item))
            pairs.append((user, item))
    return kcore_counts([p for p in pairs if p[1] in described], min_user, min_item), len(reviews) - len(pairs)


def table_numbers(output: str) -> tuple[int, int, int]:
    row = next(line for line in output.splitlines() if re.search(r"\d+\.\d\d%", line))
    numbers = re.findall(r"[\d,]+(?:\.\d+)?", row)
    return int(numbers[0].replace(",", "")), int(numbers[1].replace(",", "")), int(numbers[2].replace(",", ""))


@pytest.mark.parametrize(("release", "gz"), [("2018", True), ("2018", False), ("2023", True), ("2023", False)])
def test_paper_filter_counts_via_cli(tmp_path: Path, release: str, gz: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRISMREC_HOME", str(tmp_path / "home"))
    reviews, described = write_fixture(tmp_path / "data" / "amazon-games", release, gz)
    (users, items, interactions), duplicates = expected(reviews, described, 5, 3)
    assert duplicates > 0 and 0 < interactions < len(reviews)  # the fixture exercises dedupe and filter

    result = CliRunner().invoke(app, ["data", "stats", "amazon-games", "--data-dir", str(tmp_path / "data"),
                                      "--option", f"release={release}"])
    assert result.exit_code == 0, result.output
    assert table_numbers(result.output) == (users, items, interactions)
    assert "users with < 5 and items with < 3" in result.output
    assert f"{duplicates} duplicate interactions" in result.output

    loader = AmazonGames(AmazonOptions(release=release))
    raw = loader.load(tmp_path / "data" / "amazon-games")
    assert loader.report.duplicate_interactions == duplicates
    assert loader.report.duplicate_items == 1
    first_seen: dict[tuple[str, str], int] = {}
    for user, item, ts in reviews:
        first_seen.setdefault((user, item), ts)
    assert list(raw.interactions.itertuples(index=False, name=None)) == [(u, i, t) for (u, i), t in first_seen.items()]
    assert len(raw.items) == len(described)
    seqs = build_sequences(raw, 5, 3)
    assert (seqs.n_users, seqs.n_items, seqs.n_interactions) == (users, items, interactions)
    for ts in seqs.timestamps:
        assert (ts[1:] >= ts[:-1]).all()


@pytest.mark.parametrize("release", ["2018", "2023"])
def test_attributes_and_image_urls(tmp_path: Path, release: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRISMREC_HOME", str(tmp_path / "home"))
    root = tmp_path / "amazon"
    reviews, described = write_fixture(root, release, gz=True)
    first = sorted(described)[0]
    # One image already in the cache: the loader must point image_path at it.
    cached = ImageCache().store(f"https://img.example/{first}.jpg", b"jpegbytes", "jpg")
    raw = AmazonReviews(AmazonOptions(release=release)).load(root)
    row = raw.items.set_index("item").loc[first]
    assert row["title"] == "Game & Title 0"
    assert row["description"] == "Great game number 0"
    assert row["categories"] == "Video Games, PC, Games"
    assert row["brand"] == "Studio"
    assert row["image_url"] == f"https://img.example/{first}.jpg"  # high-res (2018) / MAIN large (2023)
    assert row["image_path"] == cached
    assert raw.items["image_path"].isna().sum() == len(described) - 1
    assert raw.attribute_columns[0] == "title"
    if release == "2023":
        assert row["details"] == "Release date: 2015"
        assert raw.interactions["timestamp"].iloc[0] == reviews[0][2]  # milliseconds -> seconds


def test_truncated_gzip_is_reported(tmp_path: Path) -> None:
    write_fixture(tmp_path, "2018", gz=True)
    path = tmp_path / "Video_Games.json.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated or corrupt") as info:
        AmazonReviews().load(tmp_path)
    assert info.value.path == path and info.value.line is not None and info.value.line > 1


@pytest.mark.parametrize("gz", [True, False])
def test_malformed_line_stop_or_skip(tmp_path: Path, gz: bool) -> None:
    reviews, described = write_fixture(tmp_path, "2018", gz=gz)
    name = "Video_Games.json" + (".gz" if gz else "")
    lines = [json.dumps(review_line("2018", *r)) for r in reviews]
    lines[6] = lines[6][:-5]  # cut mid-object: line 7
    lines[19] = '["not", "an", "object"]'  # line 20
    write_lines(tmp_path / name, lines, gz)

    with pytest.raises(DataError, match="malformed JSON") as info:
        AmazonReviews().load(tmp_path)
    assert info.value.path == tmp_path / name and info.value.line == 7
    assert f"{name}, line 7" in str(info.value)

    loader = AmazonReviews(AmazonOptions(on_bad_line="skip"))
    raw = loader.load(tmp_path)
    report = loader.report.files[0]
    assert report.skipped == 2 and report.lines == len(reviews)
    assert report.examples[0].startswith("line 7:") and report.examples[1].startswith("line 20:")
    kept = [r for n, r in enumerate(reviews) if n not in (6, 19)]
    cli = CliRunner().invoke(app, ["data", "stats", "amazon", "--data-dir", str(tmp_path.parent), "--folder",
                                   tmp_path.name, "-o", "on_bad_line=skip"])
    assert cli.exit_code == 0, cli.output
    assert "2 bad lines skipped (first: line 7: malformed JSON (Expecting" in " ".join(cli.output.split())
    stopped = CliRunner().invoke(app, ["data", "stats", "amazon", "--data-dir", str(tmp_path.parent), "--folder",
                                       tmp_path.name])
    assert stopped.exit_code == 2 and "line 7: malformed JSON" in " ".join(stopped.output.split())
    (_, _, interactions), duplicates = expected(kept, described, 1, 1)
    assert len(raw.interactions) == len(kept) - duplicates
    assert build_sequences(raw).n_interactions == interactions


def test_missing_and_mistyped_fields(tmp_path: Path) -> None:
    reviews, _ = write_fixture(tmp_path, "2018", gz=False)
    records = [review_line("2018", *r) for r in reviews]
    del records[2]["asin"]
    records[4]["unixReviewTime"] = "yesterday"
    write_lines(tmp_path / "Video_Games.json", [json.dumps(r) for r in records], gz=False)
    with pytest.raises(DataError, match="missing field 'asin'") as info:
        AmazonReviews().load(tmp_path)
    assert info.value.line == 3
    loader = AmazonReviews(AmazonOptions(on_bad_line="skip"))
    loader.load(tmp_path)
    assert loader.report.files[0].skipped == 2
    assert "must be an integer" in loader.report.files[0].examples[1]


def test_python_literal_lines_only_on_request(tmp_path: Path) -> None:
    write_fixture(tmp_path, "2018", gz=True)
    meta = [repr(meta_line("2018", f"B00{n:05d}", n)) for n in range(N_ITEMS)]  # the 2014 metadata format
    meta.append("__import__('os').system('echo pwned')")  # must never be evaluated
    write_lines(tmp_path / "meta_Video_Games.json.gz", meta, gz=True)
    with pytest.raises(DataError, match="python_literals=true") as info:
        AmazonReviews().load(tmp_path)
    assert info.value.line == 1
    with pytest.raises(DataError, match="malformed JSON") as info:
        AmazonReviews(AmazonOptions(python_literals=True)).load(tmp_path)
    assert info.value.line == N_ITEMS + 1  # the code line is refused, not run
    loader = AmazonReviews(AmazonOptions(python_literals=True, on_bad_line="skip"))
    raw = loader.load(tmp_path)
    assert len(raw.items) == N_ITEMS and loader.report.skipped_lines == 1


def test_missing_files_and_bad_category(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no reviews file found; looked for Video_Games\.json\.gz"):
        AmazonReviews().load(tmp_path)
    with pytest.raises(ValueError, match="category"):
        AmazonOptions(category="../etc")
    with pytest.raises(DataError, match="outside the dataset root"):
        AmazonReviews(AmazonOptions(reviews_file="../reviews.json")).load(tmp_path)


def test_blank_lines_crlf_and_main_category_fallback(tmp_path: Path) -> None:
    reviews, _ = write_fixture(tmp_path, "2018", gz=False)
    lines = [json.dumps(review_line("2018", *r)) for r in reviews]
    text = "\r\n".join(lines[:10]) + "\r\n\r\n   \n" + "\n".join(lines[10:]) + "\n"
    (tmp_path / "Video_Games.json").write_text(text)
    meta = [meta_line("2018", f"B00{n:05d}", n) for n in range(N_ITEMS)]
    meta[0]["category"] = []
    meta[0]["main_cat"] = "Video Games"
    write_lines(tmp_path / "meta_Video_Games.json", [json.dumps(m) for m in meta], gz=False)
    loader = AmazonReviews()
    raw = loader.load(tmp_path)
    assert loader.report.files[0].lines == len(reviews) and loader.report.files[0].skipped == 0
    assert raw.items.set_index("item").loc["B0000000", "categories"] == "Video Games"
