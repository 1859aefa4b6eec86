"""MovieLens ``ml-latest-small`` with TMDB overviews and posters (the embedded default dataset).

Files (see the bundle's MANIFEST): ``ratings.csv`` and ``movies.csv`` are required; ``tags.csv``,
``overviews.csv`` and ``posters/{movieId}.jpg`` are used where present, so the plain GroupLens zip
(no posters, no overviews) loads too. Every rating counts as an interaction (implicit feedback, as in
the paper). Textual attributes per movie: title (without the year), year, genres, overview and the
most frequent user tags.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import ClassVar

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from prismrec.data.dataset import RawDataset
from prismrec.data.io import read_csv_checked
from prismrec.data.loaders import DATASETS
from prismrec.data.paths import safe_join

_YEAR = re.compile(r"^(?P<title>.*?)\s*\((?P<year>\d{4})(?:[-–]\d{0,4})?\)\s*$")


def split_title_year(title: str) -> tuple[str, str | None]:
    """``"Toy Story (1995)"`` -> ``("Toy Story", "1995")``; titles without a year keep their text."""
    match = _YEAR.match(title.strip())
    if match:
        return match.group("title"), match.group("year")
    return title.strip(), None


class MovieLensOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    top_tags: int = Field(5, ge=0, description="how many of the most frequent user tags to keep per movie")
    min_rating: float | None = Field(None, description="keep only ratings >= this (None: all ratings count)")


@DATASETS.register("movielens-small")
class MovieLensSmall:
    """Loader for the ``movielens-small`` folder."""

    Options: ClassVar[type[BaseModel]] = MovieLensOptions
    folder: ClassVar[str] = "movielens-small"

    def __init__(self, options: MovieLensOptions | None = None) -> None:
        self.options = options or MovieLensOptions()

    def load(self, root: Path) -> RawDataset:
        root = Path(root)
        ratings = read_csv_checked(root / "ratings.csv", ["userId", "movieId", "rating", "timestamp"],
                                   integer=["userId", "movieId", "timestamp"], numeric=["rating"])
        if self.options.min_rating is not None:
            ratings = ratings[ratings["rating"] >= self.options.min_rating]
        movies = read_csv_checked(root / "movies.csv", ["movieId", "title", "genres"], integer=["movieId"])
        sources = [root / "ratings.csv", root / "movies.csv"]

        titles, years = zip(*(split_title_year(t) for t in movies["title"]), strict=True) if len(movies) else ((), ())
        items = pd.DataFrame({
            "item": movies["movieId"].astype(str).to_numpy(),
            "title": list(titles),
            "year": list(years),
            "genres": [None if g in ("", "(no genres listed)") else g.replace("|", ", ") for g in movies["genres"]],
        })

        overview_path = root / "overviews.csv"
        overviews: dict[str, str] = {}
        if overview_path.exists():
            frame = read_csv_checked(overview_path, ["movieId", "overview"], integer=["movieId"])
            overviews = dict(zip(frame["movieId"].astype(str), frame["overview"], strict=True))
            sources.append(overview_path)
        items["overview"] = [overviews.get(i) or None for i in items["item"]]

        tags_path = root / "tags.csv"
        top_tags: dict[str, str] = {}
        if tags_path.exists() and self.options.top_tags > 0:
            tags = read_csv_checked(tags_path, ["userId", "movieId", "tag", "timestamp"], integer=["movieId"])
            tags = tags.assign(tag=tags["tag"].str.strip().str.lower(), movieId=tags["movieId"].astype(str))
            tags = tags[tags["tag"] != ""]
            counts = tags.groupby(["movieId", "tag"], sort=True).size().reset_index(name="n")
            counts = counts.sort_values(["movieId", "n", "tag"], ascending=[True, False, True], kind="mergesort")
            for movie, group in counts.groupby("movieId", sort=False):
                top_tags[str(movie)] = ", ".join(group["tag"].head(self.options.top_tags))
            sources.append(tags_path)
        items["tags"] = [top_tags.get(i) for i in items["item"]]

        poster_dir = root / "posters"
        images: list[Path | None] = []
        for item in items["item"]:
            candidate = safe_join(root, f"posters/{item}.jpg")
            images.append(candidate if poster_dir.is_dir() and candidate.is_file() else None)
        items["image_path"] = images

        interactions = pd.DataFrame({
            "user": ratings["userId"].astype(str).to_numpy(),
            "item": ratings["movieId"].astype(str).to_numpy(),
            "timestamp": ratings["timestamp"].to_numpy(),
        })
        return RawDataset(
            name="movielens-small",
            root=root,
            interactions=interactions,
            items=items,
            attribute_columns=["title", "year", "genres", "overview", "tags"],
            sources=sources,
        )
