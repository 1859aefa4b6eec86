from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from prismrec.data import DataError, DatasetNotFoundError, load_raw, load_sequences
from prismrec.data.movielens import split_title_year
from prismrec.data.paths import resolve_dataset_root, safe_join

from conftest import write_movielens


def test_real_movielens_counts_and_attributes(movielens_sequences):
    ds = movielens_sequences
    assert (ds.n_users, ds.n_items, ds.n_interactions) == (610, 9724, 100836)
    toy_story = ds.item_index()["1"]
    attrs = ds.item_attributes(toy_story)
    assert attrs["title"] == "Toy Story"
    assert attrs["year"] == "1995"
    assert "Animation" in attrs["genres"]
    assert "Woody" in attrs["overview"]
    assert "pixar" in attrs["tags"]
    poster = ds.image_path(toy_story)
    assert poster is not None and poster.name == "1.jpg" and ds.root in poster.parents
    with_images = sum(ds.image_path(i) is not None for i in range(1, ds.n_items + 1))
    assert with_images == 9499  # MANIFEST: posters for 9,499 of the 9,724 rated movies


def test_sequences_are_chronological_and_stable(movielens_sequences):
    ds = movielens_sequences
    for ts in ds.timestamps:
        assert np.all(np.diff(ts) >= 0)
    # Same files, same sequences: the fingerprint is deterministic.
    again = load_sequences("movielens-small")
    assert again.fingerprint == ds.fingerprint
    assert all(np.array_equal(a, b) for a, b in zip(again.sequences, ds.sequences, strict=True))


def test_equal_timestamps_keep_file_order(tmp_path):
    write_movielens(tmp_path, "userId,movieId,rating,timestamp\n1,5,4,100\n1,3,4,100\n1,9,4,50\n1,4,4,100\n")
    ds = load_sequences("movielens-small", tmp_path)
    external = [ds.item_ids[i] for i in ds.sequences[0]]
    assert external == ["9", "5", "3", "4"]


def test_k_core_filter_is_iterative(tmp_path):
    rows = ["userId,movieId,rating,timestamp"]
    # users 1-3 share items 1-3; user 4 has items 1 and 9 (item 9 appears once).
    for u in (1, 2, 3):
        rows += [f"{u},{i},4,{i}" for i in (1, 2, 3)]
    rows += ["4,1,4,1", "4,9,4,2"]
    write_movielens(tmp_path, "\n".join(rows) + "\n")
    ds = load_sequences("movielens-small", tmp_path, min_user_interactions=3, min_item_interactions=2)
    assert ds.n_users == 3 and ds.n_items == 3 and ds.n_interactions == 9


def test_title_year_split():
    assert split_title_year("Toy Story (1995)") == ("Toy Story", "1995")
    assert split_title_year("Babylon 5") == ("Babylon 5", None)
    assert split_title_year("Fawlty Towers (1975-1979)") == ("Fawlty Towers", "1975")


@pytest.mark.parametrize(
    ("ratings", "message", "line"),
    [
        ("userId,movieId,timestamp\n1,1,5\n", "missing column(s) rating", 1),
        ("userId,movieId,rating,timestamp\n1,1,4,100\n2,x7,4,100\n", "'movieId' must be an integer, got 'x7'", 3),
        ("userId,movieId,rating,timestamp\n1,1,4,100\n1,2,four,100\n", "'rating' must be a number", 3),
        ("", "file is empty", 1),
    ],
)
def test_bad_ratings_file_names_file_and_line(tmp_path, ratings, message, line):
    folder = write_movielens(tmp_path, ratings)
    with pytest.raises(DataError) as info:
        load_raw("movielens-small", tmp_path)
    assert message in str(info.value)
    assert info.value.path == folder / "ratings.csv"
    assert info.value.line == line


def test_non_utf8_text_reports_line(tmp_path):
    folder = write_movielens(tmp_path, "userId,movieId,rating,timestamp\n1,1,4,100\n")
    (folder / "movies.csv").write_bytes(b"movieId,title,genres\n1,Ok (2000),Drama\n2,Caf\xe9 (2001),Drama\n")
    with pytest.raises(DataError, match="not valid UTF-8") as info:
        load_raw("movielens-small", tmp_path)
    assert info.value.path == folder / "movies.csv" and info.value.line == 3


def test_unreadable_file(tmp_path):
    folder = write_movielens(tmp_path, "userId,movieId,rating,timestamp\n1,1,4,100\n")
    (folder / "ratings.csv").unlink()
    (folder / "ratings.csv").mkdir()  # a directory where a file should be: reading fails for everyone, root too
    with pytest.raises(DataError, match="cannot read file") as info:
        load_raw("movielens-small", tmp_path)
    assert info.value.path == folder / "ratings.csv"


def test_empty_after_filtering(tmp_path):
    write_movielens(tmp_path, "userId,movieId,rating,timestamp\n1,1,4,100\n2,2,4,100\n")
    with pytest.raises(DataError, match="empty after filtering"):
        load_sequences("movielens-small", tmp_path, min_user_interactions=5)


def test_data_dir_resolution_order(tmp_path, monkeypatch):
    write_movielens(tmp_path / "explicit", "userId,movieId,rating,timestamp\n1,1,4,100\n")
    write_movielens(tmp_path / "env", "userId,movieId,rating,timestamp\n1,1,4,100\n")
    monkeypatch.setenv("PRISMREC_DATA_DIR", str(tmp_path / "env"))
    assert resolve_dataset_root("movielens-small", tmp_path / "explicit") == (tmp_path / "explicit/movielens-small")
    assert resolve_dataset_root("movielens-small") == (tmp_path / "env/movielens-small").resolve()
    with pytest.raises(DatasetNotFoundError) as info:
        resolve_dataset_root("movielens-small", tmp_path / "nowhere")
    assert "--data-dir" in str(info.value) and "prismrec data download" in str(info.value)


def test_paths_from_data_stay_inside_root(tmp_path):
    root = tmp_path / "ds"
    (root / "posters").mkdir(parents=True)
    assert safe_join(root, "posters/1.jpg") == (root / "posters/1.jpg").resolve()
    for bad in ("../secret.txt", "posters/../../x", "/etc/passwd"):
        with pytest.raises(DataError):
            safe_join(root, bad)
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "posters" / "link").symlink_to(outside)
    with pytest.raises(DataError, match="outside"):
        safe_join(root, Path("posters/link/x.jpg"))
