"""Yelp Open Dataset restaurants: businesses, reviews and one photo per business, read as a stream.

Files (JSON lines, gzipped or plain; names are options, the defaults try the official names first):
``yelp_academic_dataset_business.json`` / ``business.json`` (``business_id``, ``name``, ``categories`` as
one comma-separated string, ``city``, ``state``, ``stars``, ``attributes``), ``yelp_academic_dataset_review.json``
/ ``review.json`` (``review_id``, ``user_id``, ``business_id``, ``date`` as ``YYYY-MM-DD HH:MM:SS``, taken as
UTC), and optionally ``photos.json`` / ``photo.json`` (``photo_id``, ``business_id``, ``label``) with the
``photos/`` folder holding ``{photo_id}.jpg``.

Items: businesses whose categories include ``Restaurants`` (the ``category`` option; whole category
names, case-insensitive). Textual attributes: title (the name), categories, location (city, state),
price (``RestaurantsPriceRange2`` as ``$``..``$$$$``) and stars. Reviews of other businesses are dropped
while streaming (counted). A duplicate review is the same user, business and date again (the same
review repeated; first kept, counted); a user who reviews a restaurant again later is a new interaction.

Photo rule: for each restaurant, the first photo in ``photos.json`` order whose label is ``food``; if
none, the first labelled ``inside``; if none, the first photo with any label (``any_photo_fallback``).
Only photos whose file exists count. Paper filter: users with fewer than 4 and items with fewer than 3
interactions removed.
"""

from __future__ import annotations

import calendar
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from prismrec.data.dataset import RawDataset
from prismrec.data.generic import PaperFilter, clean_text, find_file
from prismrec.data.jsonl import (
    BadLinePolicy,
    BadRecord,
    InteractionColumns,
    JsonLinesReader,
    LoadReport,
    require_str,
)
from prismrec.data.loaders import DATASETS
from prismrec.data.paths import safe_join

ATTRIBUTES = ["title", "categories", "location", "price", "stars"]


def _candidates(name: str | None, defaults: list[str]) -> list[str]:
    if name:
        return [name]
    return [f"{d}{suffix}" for d in defaults for suffix in ("", ".gz")]


def parse_yelp_date(value: str) -> int:
    """``"2018-07-07 22:09:11"`` (UTC) -> Unix seconds; ``ValueError`` when it is not a date."""
    return calendar.timegm(datetime.fromisoformat(value).timetuple())


class YelpOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    business_file: str | None = Field(None, description="default: yelp_academic_dataset_business.json, business.json")
    review_file: str | None = Field(None, description="default: yelp_academic_dataset_review.json, review.json")
    photo_file: str | None = Field(None, description="default: photos.json, photo.json (optional file)")
    photo_dir: str = Field("photos", description="folder holding {photo_id}.jpg")
    category: str = Field("Restaurants", description="keep businesses having this category")
    photo_labels: list[str] = Field(["food", "inside"], description="preferred photo labels, in order")
    any_photo_fallback: bool = Field(True, description="use a photo with another label when none is preferred")
    on_bad_line: BadLinePolicy = Field("stop", description="stop at a malformed line, or skip and count it")


@DATASETS.register("yelp")
class YelpRestaurants:
    """Loader for the Yelp Open Dataset restaurants (see the module docstring)."""

    Options: ClassVar[type[BaseModel]] = YelpOptions
    folder: ClassVar[str] = "yelp"
    paper_filter: ClassVar[PaperFilter | None] = PaperFilter(min_user_interactions=4, min_item_interactions=3)

    def __init__(self, options: YelpOptions | None = None) -> None:
        self.options = options or YelpOptions()
        self.report = LoadReport()

    def load(self, root: Path) -> RawDataset:
        opts = self.options
        root = Path(root).resolve()
        self.report = LoadReport()
        business_path = find_file(root, _candidates(opts.business_file, ["yelp_academic_dataset_business.json",
                                                                        "business.json"]), "business")
        review_path = find_file(root, _candidates(opts.review_file, ["yelp_academic_dataset_review.json",
                                                                    "review.json"]), "review")
        items = self.read_businesses(business_path)
        interactions = self.read_reviews(review_path, set(items["item"]))
        sources = [business_path, review_path]
        photo_names = _candidates(opts.photo_file, ["photos.json", "photo.json", "yelp_academic_dataset_photo.json"])
        photo_path = next((p for p in (safe_join(root, n) for n in photo_names) if p.is_file()), None)
        if photo_path is None and opts.photo_file:
            find_file(root, photo_names, "photo")  # the user named one: say it is missing
        photos = self.read_photos(root, photo_path, set(items["item"])) if photo_path else {}
        if photo_path:
            sources.append(photo_path)
        items["image_path"] = [photos.get(b) for b in items["item"]]
        self.report.missing_images = int(sum(p is None for p in items["image_path"]))
        self.report.log()
        return RawDataset(name="yelp", root=root, interactions=interactions, items=items,
                          attribute_columns=list(ATTRIBUTES), sources=sources)

    def read_businesses(self, path: Path) -> pd.DataFrame:
        wanted = self.options.category.strip().lower()
        reader = JsonLinesReader(path, on_bad_line=self.options.on_bad_line, description=f"businesses {path.name}")
        rows: dict[str, list[Any]] = {name: [] for name in ["item", *ATTRIBUTES]}
        seen: set[str] = set()
        for line, record in reader:
            try:
                business = require_str(record, "business_id")
            except BadRecord as exc:
                reader.bad(line, str(exc))
                continue
            categories = record.get("categories")
            if not isinstance(categories, str):
                continue  # null categories: not a restaurant
            names = [c.strip() for c in categories.split(",") if c.strip()]
            if wanted not in (c.lower() for c in names):
                continue
            if business in seen:
                self.report.duplicate_items += 1
                continue
            seen.add(business)
            rows["item"].append(business)
            rows["title"].append(clean_text(record.get("name")))
            rows["categories"].append(", ".join(names))
            place = [p for p in (clean_text(record.get("city")), clean_text(record.get("state"))) if p]
            rows["location"].append(", ".join(place) or None)
            attributes = record.get("attributes") if isinstance(record.get("attributes"), dict) else {}
            price = str(attributes.get("RestaurantsPriceRange2", "")).strip("'\" u")
            rows["price"].append("$" * int(price) if price.isdigit() and 1 <= int(price) <= 4 else None)
            stars = record.get("stars")
            rows["stars"].append(f"{float(stars):g} stars" if isinstance(stars, int | float) else None)
        self.report.files.append(reader.report)
        return pd.DataFrame(rows)

    def read_reviews(self, path: Path, restaurants: set[str]) -> pd.DataFrame:
        reader = JsonLinesReader(path, on_bad_line=self.options.on_bad_line, description=f"reviews {path.name}")
        columns = InteractionColumns()
        for line, record in reader:
            try:
                user = require_str(record, "user_id")
                business = require_str(record, "business_id")
                date = require_str(record, "date")
                try:
                    time = parse_yelp_date(date)
                except ValueError:
                    raise BadRecord(f"field 'date' must look like 2018-07-07 22:09:11, got {date!r}") from None
            except BadRecord as exc:
                reader.bad(line, str(exc))
                continue
            if business not in restaurants:
                self.report.filtered_interactions += 1
                continue
            columns.add(user, business, time)
        self.report.files.append(reader.report)
        frame, duplicates = columns.to_frame("exact")
        self.report.duplicate_interactions += duplicates
        return frame

    def read_photos(self, root: Path, path: Path, restaurants: set[str]) -> dict[str, Path]:
        opts = self.options
        preference = {label.lower(): rank for rank, label in enumerate(opts.photo_labels)}
        fallback_rank = len(preference) if opts.any_photo_fallback else None
        best: dict[str, tuple[int, Path]] = {}
        reader = JsonLinesReader(path, on_bad_line=opts.on_bad_line, description=f"photos {path.name}")
        photo_dir = safe_join(root, opts.photo_dir)
        for line, record in reader:
            try:
                photo, business = require_str(record, "photo_id"), require_str(record, "business_id")
            except BadRecord as exc:
                reader.bad(line, str(exc))
                continue
            if business not in restaurants:
                continue
            label = str(record.get("label") or "").lower()
            rank = preference.get(label, fallback_rank)
            if rank is None or (business in best and best[business][0] <= rank):
                continue  # an earlier photo is as good or better
            file = safe_join(photo_dir, f"{photo}.jpg", source=path, line=line)
            if file.is_file():
                best[business] = (rank, file)
        self.report.files.append(reader.report)
        return {business: file for business, (_, file) in best.items()}
