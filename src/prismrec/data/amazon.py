"""Amazon Reviews, both public releases (McAuley lab), gzipped or plain JSON lines, read as a stream.

2018 release (``release="2018"``): reviews ``{Category}.json.gz`` (or the 5-core ``{Category}_5.json.gz``)
with ``reviewerID``, ``asin``, ``overall``, ``unixReviewTime`` (seconds), and metadata
``meta_{Category}.json.gz`` with ``asin``, ``title``, ``brand``, ``category`` (list), ``description``
(list), ``feature`` (list), ``details`` and ``imageURLHighRes`` / ``imageURL`` (lists). The 2014 release
has the same review fields; its metadata lines are Python dict literals, parsed with
``ast.literal_eval`` only when ``python_literals=true`` (never ``eval``).

2023 release (``release="2023"``): reviews ``{Category}.jsonl(.gz)`` with ``user_id``, ``parent_asin``,
``rating``, ``timestamp`` (milliseconds; stored as seconds, ties keep file order) and metadata
``meta_{Category}.jsonl(.gz)`` with ``parent_asin``, ``title``, ``store``, ``categories``, ``features``,
``description``, ``details`` and ``images`` (list of ``{thumb, large, hi_res, variant}``).

Items: one per metadata record, textual attributes ``title, brand, categories, features, description,
details`` (brand is ``store`` in 2023; categories fall back to ``main_cat`` / ``main_category`` when the
list is empty), HTML stripped. Image: 2018 the first ``imageURLHighRes`` (the
``imageURL`` entries are 40-pixel thumbnails, used only when there is nothing else); 2023 the ``MAIN``
image (else the first), its ``large`` size, else ``hi_res``, else ``thumb``. Only http/https URLs are
kept; they resolve to the image cache filled by ``prismrec data fetch-images``.

Every review is one interaction. Duplicate reviews (the same user and item again; the dumps repeat
reviews) are dropped, the first in file order kept, and counted. Reviews of items without metadata are
kept here and dropped by ``build_sequences`` (they cannot be described). The paper's filter for Games
(``amazon-games``): users with fewer than 5 and items with fewer than 3 interactions removed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from prismrec.data.dataset import RawDataset
from prismrec.data.generic import PaperFilter, clean_text, find_file, resolve_images
from prismrec.data.images import ALLOWED_SCHEMES, url_scheme
from prismrec.data.jsonl import (
    BadLinePolicy,
    BadRecord,
    InteractionColumns,
    JsonLinesReader,
    LoadReport,
    require_int,
    require_str,
)
from prismrec.data.loaders import DATASETS

ATTRIBUTES = ["title", "brand", "categories", "features", "description", "details"]
_REVIEW_FIELDS = {"2018": ("reviewerID", "asin", "unixReviewTime"), "2023": ("user_id", "parent_asin", "timestamp")}


class AmazonOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    release: Literal["2018", "2023"] = "2018"
    category: str = Field("Video_Games", pattern=r"^[A-Za-z0-9_&,\-]+$",
                          description="category part of the file names, e.g. Video_Games")
    reviews_file: str | None = Field(None, description="default: the release's usual name for the category")
    meta_file: str | None = Field(None, description="default: meta_<category>.json(l)(.gz)")
    on_bad_line: BadLinePolicy = Field("stop", description="stop at a malformed line, or skip and count it")
    python_literals: bool = Field(False, description="accept Python dict literal lines (2014 release)")


def _http_url(value: Any) -> str | None:
    if isinstance(value, str) and url_scheme(value.strip()) in ALLOWED_SCHEMES:
        return value.strip()
    return None


def image_url_2018(record: dict[str, Any]) -> str | None:
    for key in ("imageURLHighRes", "imageURL"):
        values = record.get(key)
        for value in values if isinstance(values, list) else [values]:
            url = _http_url(value)
            if url:
                return url
    return None


def image_url_2023(record: dict[str, Any]) -> str | None:
    images = [i for i in record.get("images") or [] if isinstance(i, dict)]
    images.sort(key=lambda i: i.get("variant") != "MAIN")  # stable: MAIN first, else file order
    for image in images:
        for size in ("large", "hi_res", "thumb"):
            url = _http_url(image.get(size))
            if url:
                return url
    return None


@DATASETS.register("amazon")
class AmazonReviews:
    """Loader for one category of Amazon Reviews 2018 or 2023 (see the module docstring)."""

    Options: ClassVar[type[BaseModel]] = AmazonOptions
    folder: ClassVar[str] = "amazon"
    paper_filter: ClassVar[PaperFilter | None] = None
    dataset_name: ClassVar[str] = "amazon"

    def __init__(self, options: AmazonOptions | None = None) -> None:
        self.options = options or AmazonOptions()
        self.report = LoadReport()

    def files(self, root: Path) -> tuple[Path, Path]:
        opts = self.options
        cat = opts.category
        ext = "json" if opts.release == "2018" else "jsonl"
        names = [f"{cat}.{ext}.gz", f"{cat}.{ext}"]
        if opts.release == "2018":
            names += [f"{cat}_5.json.gz", f"{cat}_5.json", f"reviews_{cat}.json.gz", f"reviews_{cat}_5.json.gz"]
        reviews = find_file(root, [opts.reviews_file] if opts.reviews_file else names, "reviews")
        meta_names = [f"meta_{cat}.{ext}.gz", f"meta_{cat}.{ext}"]
        meta = find_file(root, [opts.meta_file] if opts.meta_file else meta_names, "metadata")
        return reviews, meta

    def load(self, root: Path) -> RawDataset:
        root = Path(root).resolve()
        self.report = LoadReport()
        reviews_path, meta_path = self.files(root)
        interactions = self.read_reviews(reviews_path)
        items = self.read_meta(root, meta_path)
        self.report.log()
        return RawDataset(name=self.dataset_name, root=root, interactions=interactions, items=items,
                          attribute_columns=list(ATTRIBUTES), sources=[reviews_path, meta_path])

    def read_reviews(self, path: Path) -> pd.DataFrame:
        opts = self.options
        reader = JsonLinesReader(path, on_bad_line=opts.on_bad_line, python_literals=opts.python_literals,
                                 description=f"reviews {path.name}")
        columns = InteractionColumns()
        # The hot loop (tens of millions of lines in the full dumps): bound methods and dicts as locals.
        user_codes, item_codes = columns.user_codes, columns.item_codes
        add_user, add_item, add_time = columns.users.append, columns.items.append, columns.timestamps.append
        user_key, item_key, time_key = _REVIEW_FIELDS[opts.release]
        divisor = 1000 if opts.release == "2023" else 1
        for line, record in reader:
            # Fast path for well-formed records; the checked helpers explain anything else.
            user, item, time = record.get(user_key), record.get(item_key), record.get(time_key)
            if type(user) is not str or type(item) is not str or type(time) is not int or not user or not item:
                try:
                    user, item = require_str(record, user_key), require_str(record, item_key)
                    time = require_int(record, time_key)
                except BadRecord as exc:
                    reader.bad(line, str(exc))
                    continue
            add_user(user_codes.setdefault(user, len(user_codes)))
            add_item(item_codes.setdefault(item, len(item_codes)))
            add_time(time // divisor if divisor != 1 else time)
        self.report.files.append(reader.report)
        frame, duplicates = columns.to_frame("user_item")
        self.report.duplicate_interactions += duplicates
        return frame

    def read_meta(self, root: Path, path: Path) -> pd.DataFrame:
        opts = self.options
        reader = JsonLinesReader(path, on_bad_line=opts.on_bad_line, python_literals=opts.python_literals,
                                 description=f"metadata {path.name}")
        id_key = "asin" if opts.release == "2018" else "parent_asin"
        seen: set[str] = set()
        rows: dict[str, list[Any]] = {name: [] for name in ["item", *ATTRIBUTES]}
        image_urls: list[str | None] = []
        lines: list[int] = []
        for line, record in reader:
            try:
                item = require_str(record, id_key)
            except BadRecord as exc:
                reader.bad(line, str(exc))
                continue
            if item in seen:
                self.report.duplicate_items += 1
                continue
            seen.add(item)
            rows["item"].append(item)
            rows["title"].append(clean_text(record.get("title")))
            if opts.release == "2018":
                rows["brand"].append(clean_text(record.get("brand")))
                rows["categories"].append(clean_text(record.get("category")) or clean_text(record.get("main_cat")))
                rows["features"].append(clean_text(record.get("feature"), separator="; "))
                image_urls.append(image_url_2018(record))
            else:
                rows["brand"].append(clean_text(record.get("store")))
                rows["categories"].append(clean_text(record.get("categories"))
                                          or clean_text(record.get("main_category")))
                rows["features"].append(clean_text(record.get("features"), separator="; "))
                image_urls.append(image_url_2023(record))
            rows["description"].append(clean_text(record.get("description"), separator=" "))
            rows["details"].append(clean_text(record.get("details")) if isinstance(record.get("details"), dict)
                                   else None)
            lines.append(line)
        self.report.files.append(reader.report)
        items = pd.DataFrame(rows)
        items["image_path"], items["image_url"] = resolve_images(root, image_urls, path, lines, self.report)
        return items


@DATASETS.register("amazon-games")
class AmazonGames(AmazonReviews):
    """Amazon ``Video_Games`` with the paper's filter (section 4.1.1): users < 5 and items < 3 removed."""

    folder: ClassVar[str] = "amazon-games"
    paper_filter: ClassVar[PaperFilter | None] = PaperFilter(min_user_interactions=5, min_item_interactions=3)
    dataset_name: ClassVar[str] = "amazon-games"
