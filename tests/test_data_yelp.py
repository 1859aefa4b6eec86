"""Yelp Open Dataset loader on small fixtures written in the real formats."""

from __future__ import annotations

import calendar
import gzip
import json
import random
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from prismrec.cli.app import app
from prismrec.data import DataError, build_sequences
from prismrec.data.yelp import YelpOptions, YelpRestaurants
from test_data_amazon import kcore_counts, table_numbers


def business(bid: str, categories: str | None, n: int) -> dict:
    return {"business_id": bid, "name": f"Place {n}", "address": "1 Main St", "city": "Tucson", "state": "AZ",
            "postal_code": "85701", "latitude": 32.2, "longitude": -110.9, "stars": 4.5, "review_count": 10,
            "is_open": 1, "attributes": {"RestaurantsPriceRange2": "2", "WiFi": "u'free'"},
            "categories": categories, "hours": None}


def write_lines(path: Path, rows: list[dict | str], gz: bool = False) -> None:
    data = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()
    path.write_bytes(gzip.compress(data) if gz else data)


def write_fixture(root: Path, gz: bool, seed: int = 1) -> tuple[list[tuple[str, str, str]], set[str]]:
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows, restaurants = [], set()
    for n in range(45):
        bid = f"biz{n:03d}-{'x' * 12}"
        if n % 5 == 0:
            categories = "Shopping, Books"
        elif n % 7 == 0:
            categories = "Restaurant Supplies, Wholesale"  # not a restaurant: whole names only
        elif n == 44:
            categories = None
        else:
            categories = "Food, Restaurants, Pizza" if n % 2 else "restaurants, Thai"
            restaurants.add(bid)
        rows.append(business(bid, categories, n))
    write_lines(root / ("business.json.gz" if gz else "business.json"), rows, gz)

    bids = [r["business_id"] for r in rows]
    reviews, lines = [], []
    user_weights = [1.0 / (k + 1) ** 0.7 for k in range(120)]
    for k in range(450):
        user = f"user{rng.choices(range(120), user_weights)[0]:03d}"
        bid = bids[min(int(rng.expovariate(1 / 12)), len(bids) - 1)]
        date = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(1_400_000_000 + rng.randrange(10**8)))
        review = {"review_id": f"r{k:05d}", "user_id": user, "business_id": bid, "stars": 4.0, "useful": 0,
                  "funny": 0, "cool": 0, "text": "tasty", "date": date}
        reviews.append((date, user, bid))
        lines.append(review)
    lines += [lines[3], lines[10]]  # the same reviews again
    reviews += [reviews[3], reviews[10]]
    write_lines(root / ("review.json.gz" if gz else "review.json"), lines, gz)
    return reviews, restaurants


def expected(reviews: list[tuple[str, str, str]], restaurants: set[str], min_user: int, min_item: int):
    seen: set[tuple[str, str, str]] = set()
    pairs = []
    for date, user, bid in reviews:  # a duplicate is the same user, business and date again
        if bid in restaurants and (date, user, bid) not in seen:
            seen.add((date, user, bid))
            pairs.append((user, bid))
    return kcore_counts(pairs, min_user, min_item)


@pytest.mark.parametrize("gz", [True, False])
def test_paper_filter_counts_via_cli(tmp_path: Path, gz: bool) -> None:
    reviews, restaurants = write_fixture(tmp_path / "yelp", gz)
    users, items, interactions = expected(reviews, restaurants, 4, 3)
    assert 0 < interactions < len(reviews)
    result = CliRunner().invoke(app, ["data", "stats", "yelp", "--data-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert table_numbers(result.output) == (users, items, interactions)
    assert "users with < 4 and items with < 3" in result.output
    duplicates = sum(1 for k in (3, 10) if reviews[k][2] in restaurants)
    assert duplicates >= 1 and f"{duplicates} duplicate interactions" in result.output

    loader = YelpRestaurants()
    raw = loader.load(tmp_path / "yelp")
    assert set(raw.items["item"]) == restaurants
    assert loader.report.duplicate_interactions == duplicates
    assert loader.report.filtered_interactions == sum(1 for _, _, b in reviews if b not in restaurants)
    row = raw.items.set_index("item").loc[sorted(restaurants)[0]]
    assert row["title"].startswith("Place ") and row["location"] == "Tucson, AZ" and row["price"] == "$$"
    # Dates are UTC wall-clock times.
    first = json.loads((gzip.decompress if gz else bytes)((tmp_path / "yelp" / (
        "review.json.gz" if gz else "review.json")).read_bytes()).splitlines()[0])
    if first["business_id"] in restaurants:
        expected_ts = calendar.timegm(time.strptime(first["date"], "%Y-%m-%d %H:%M:%S"))
        assert raw.interactions["timestamp"].iloc[0] == expected_ts
    seqs = build_sequences(raw, 4, 3)
    assert (seqs.n_users, seqs.n_items, seqs.n_interactions) == (users, items, interactions)


def test_photo_choice_prefers_food_then_inside(tmp_path: Path) -> None:
    root = tmp_path / "yelp"
    _, restaurants = write_fixture(root, gz=False)
    a, b, c, d = sorted(restaurants)[:4]
    (root / "photos").mkdir()
    for photo in ("p1", "p2", "p4", "p5", "p6", "p7", "p9"):
        (root / "photos" / f"{photo}.jpg").write_bytes(b"\xff\xd8fake")
    write_lines(root / "photos.json", [
        {"photo_id": "p1", "business_id": a, "caption": "", "label": "outside"},
        {"photo_id": "p2", "business_id": a, "caption": "", "label": "inside"},
        {"photo_id": "p3", "business_id": a, "caption": "", "label": "food"},  # no file: not usable
        {"photo_id": "p4", "business_id": a, "caption": "", "label": "food"},
        {"photo_id": "p5", "business_id": b, "caption": "", "label": "menu"},
        {"photo_id": "p6", "business_id": b, "caption": "", "label": "inside"},
        {"photo_id": "p7", "business_id": c, "caption": "", "label": "drink"},
        {"photo_id": "p9", "business_id": "biz000-xxxxxxxxxxxx", "caption": "", "label": "food"},  # not a restaurant
    ])
    raw = YelpRestaurants().load(root)
    images = dict(zip(raw.items["item"], raw.items["image_path"], strict=True))
    assert images[a] == (root / "photos" / "p4.jpg").resolve()
    assert images[b] == (root / "photos" / "p6.jpg").resolve()
    assert images[c] == (root / "photos" / "p7.jpg").resolve()
    assert images[d] is None
    strict = YelpRestaurants(YelpOptions(any_photo_fallback=False)).load(root)
    assert dict(zip(strict.items["item"], strict.items["image_path"], strict=True))[c] is None


def test_photo_path_escape_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "yelp"
    _, restaurants = write_fixture(root, gz=False)
    write_lines(root / "photos.json", [
        {"photo_id": "ok", "business_id": sorted(restaurants)[0], "label": "food"},
        {"photo_id": "../../../etc/passwd", "business_id": sorted(restaurants)[0], "label": "food"},
    ])
    with pytest.raises(DataError, match="leads outside") as info:
        YelpRestaurants().load(root)
    assert info.value.path == root.resolve() / "photos.json" and info.value.line == 2


def test_bad_lines_and_dates(tmp_path: Path) -> None:
    root = tmp_path / "yelp"
    reviews, restaurants = write_fixture(root, gz=True)
    raw_lines = gzip.decompress((root / "review.json.gz").read_bytes()).decode().splitlines()
    broken = json.loads(raw_lines[4])
    broken["date"] = "last tuesday"
    raw_lines[4] = json.dumps(broken)
    raw_lines[8] = raw_lines[8].replace('"user_id"', '"uid"')
    raw_lines[12] = "{oops"
    write_lines(root / "review.json.gz", raw_lines, gz=True)
    with pytest.raises(DataError, match="field 'date' must look like") as info:
        YelpRestaurants().load(root)
    assert info.value.line == 5 and info.value.path == (root / "review.json.gz").resolve()
    loader = YelpRestaurants(YelpOptions(on_bad_line="skip"))
    raw = loader.load(root)
    assert loader.report.skipped_lines == 3
    kept = [r for n, r in enumerate(reviews) if n not in (4, 8, 12)]
    duplicates = sum(1 for k in (3, 10) if reviews[k][2] in restaurants)
    assert len(raw.interactions) == sum(1 for _, _, b in kept if b in restaurants) - duplicates


def test_missing_files_name_what_was_looked_for(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"yelp_academic_dataset_business\.json"):
        YelpRestaurants().load(tmp_path)
    write_fixture(tmp_path, gz=False)
    with pytest.raises(DataError, match="no photo file found"):
        YelpRestaurants(YelpOptions(photo_file="my_photos.json")).load(tmp_path)
