"""Exports: everything inference needs in one folder, and nothing else.

``prismrec export RUN_DIR OUT_DIR`` writes:

* ``model.safetensors``: the run's best weights (frozen semantic tables included, as buffers);
* ``item_tables.safetensors``: the precomputed user-independent item tensors. ``scoring`` is the
  ``(n_items + 1, D)`` matrix a user vector is multiplied with (DMESR: ``[e^coarse : e^fine]``, paper
  Eq. 6; SASRec: the item embeddings); DMESR also stores ``coarse`` and ``fine`` (the adapted and fused
  item vectors its sequence side reads), so serving never runs the adapters (paper section 3.4);
* ``config.toml``: the resolved run configuration;
* ``items.parquet``: internal id -> external id, the original textual attributes and the poster path
  relative to the dataset root; ``users.parquet``: each user's full history (internal ids, oldest first;
  the last item is the held-out test item of the leave-one-out split);
* ``descriptions.parquet`` + ``semantics.json`` (DMESR only): the derived descriptions and the backend,
  model and embedder that produced them, copied from the semantics artefact;
* ``manifest.json``: format, model, sizes, dataset root and the sha256 of every other file.

Loading (:func:`load_export`) checks every checksum before reading a byte of content and uses only
safetensors, parquet, JSON and TOML: nothing is ever unpickled. The safetensors files are memory-mapped
copy-on-write (:func:`mmap_safetensors`) and the model's parameters and buffers *are* those mapped
tensors (``load_state_dict(assign=True)``), so several server processes serving one export share one copy
of the weights and item tables in the page cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file, save_file

from prismrec.config import RunConfig, load_config
from prismrec.data.dataset import SequenceDataset
from prismrec.models import MODELS, Recommender
from prismrec.options import dump_toml
from prismrec.serving.inference import Ranker, item_tensors

EXPORT_FORMAT = "prismrec-export/1"
MANIFEST = "manifest.json"
MODEL_FILE = "model.safetensors"
TABLES_FILE = "item_tables.safetensors"
CONFIG_FILE = "config.toml"
ITEMS_FILE = "items.parquet"
USERS_FILE = "users.parquet"
DESCRIPTIONS_FILE = "descriptions.parquet"
SEMANTICS_FILE = "semantics.json"
DESCRIPTION_COLUMNS = ("textual", "visual", "hybrid", "original")


class ExportError(ValueError):
    """An export folder is missing, incomplete, tampered with or not loadable (the message names the file)."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _items_table(dataset: SequenceDataset) -> pd.DataFrame:
    root = Path(dataset.root).resolve()
    images: list[str | None] = []
    for item in range(1, dataset.n_items + 1):
        path = dataset.image_path(item)
        if path is None:
            images.append(None)
            continue
        try:
            images.append(Path(path).resolve().relative_to(root).as_posix())
        except ValueError:  # loaders keep images inside the root; anything else is not served
            images.append(None)
    table = {"item_id": np.arange(1, dataset.n_items + 1, dtype=np.int64),
             "external_id": [str(i) for i in dataset.item_ids[1:]], "image": images}
    for column in dataset.attribute_columns:
        table[f"attr_{column}"] = [None if v is None or (isinstance(v, float) and np.isnan(v)) else str(v)
                                   for v in dataset.items[column]]
    return pd.DataFrame(table)


def _write_users(path: Path, dataset: SequenceDataset) -> None:
    histories = pa.array([np.asarray(s, dtype=np.int64) for s in dataset.sequences], type=pa.list_(pa.int64()))
    table = pa.table({"user_id": pa.array([str(u) for u in dataset.user_ids], type=pa.string()),
                      "history": histories})
    pq.write_table(table, path)


def _copy_descriptions(semantics: str, dataset: SequenceDataset, out_dir: Path) -> dict[str, Any] | None:
    """Derived descriptions of the exported items, re-keyed by external id; None when the artefact has none."""
    from prismrec.semantics.artefact import load_artefact, resolve_artefact_dir

    folder = resolve_artefact_dir(semantics)
    artefact = load_artefact(folder)
    info = {key: artefact.manifest.get(key) for key in ("name", "format", "dataset", "backend", "embedder",
                                                         "hybrid_mode", "templates", "created_at")}
    info["name"] = info["name"] or folder.name
    source = folder / DESCRIPTIONS_FILE
    if not source.exists():
        info["descriptions"] = 0
        return info
    frame = artefact.descriptions()
    frame = frame.assign(external_id=frame["external_id"].astype(str))
    wanted = {str(i) for i in dataset.item_ids[1:]}
    keep = ["external_id", *[c for c in frame.columns if c.split("_status")[0] in DESCRIPTION_COLUMNS
                             and c != "external_id"]]
    frame = frame[frame["external_id"].isin(wanted)][keep].reset_index(drop=True)
    frame.to_parquet(out_dir / DESCRIPTIONS_FILE, index=False)
    info["descriptions"] = len(frame)
    return info


def export_model(model: Recommender, config: RunConfig, dataset: SequenceDataset, out_dir: Path,
                 source: dict[str, Any] | None = None) -> Path:
    """Write an export of ``model`` (trained on ``dataset`` under ``config``) into ``out_dir``.

    Files are written into a temporary sibling folder and renamed at the end, so ``out_dir`` is either
    the complete previous export or the complete new one.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / MANIFEST).exists():
        raise ExportError(f"{out_dir}: exists and is not an export; choose an empty or new folder")
    work = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.tmp")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    try:
        model = model.eval()
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(work / MODEL_FILE))
        with torch.no_grad():
            tables = {k: v.detach().cpu().float().contiguous() for k, v in item_tensors(model).items()}
        if tables:
            save_file(tables, str(work / TABLES_FILE))
        (work / CONFIG_FILE).write_text(dump_toml(config.to_dict()), encoding="utf-8")
        _items_table(dataset).to_parquet(work / ITEMS_FILE, index=False)
        _write_users(work / USERS_FILE, dataset)
        semantics_info = None
        semantics = getattr(config.model, "semantics", None)
        if semantics:
            semantics_info = _copy_descriptions(str(semantics), dataset, work)
            (work / SEMANTICS_FILE).write_text(json.dumps(semantics_info, indent=2, ensure_ascii=False,
                                                          default=str), encoding="utf-8")
        files = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in sorted(work.iterdir())}
        manifest = {
            "format": EXPORT_FORMAT,
            "name": out_dir.name,
            "model": config.model.name,
            "run_name": config.name,
            "n_items": dataset.n_items,
            "n_users": dataset.n_users,
            "max_len": int(model.max_len),
            "dataset": dataset.name,
            "data_root": str(Path(dataset.root).resolve()),
            "dataset_folder": Path(dataset.root).name,
            "data_fingerprint": dataset.fingerprint,
            "attribute_columns": list(dataset.attribute_columns),
            "item_tables": sorted(tables),
            "semantics": semantics_info.get("name") if semantics_info else None,
            "source": source or {},
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "files": files,
        }
        (work / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False), encoding="utf-8")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        work.replace(out_dir)
    finally:
        if work.exists():
            shutil.rmtree(work)
    return out_dir


def export_run(run_dir: Path, out_dir: Path, data_dir: Path | None = None) -> Path:
    """Export a run directory written by ``prismrec train`` (its best checkpoint)."""
    from prismrec.training import prepare_split

    run_dir = Path(run_dir)
    for name in (CONFIG_FILE, MODEL_FILE):
        if not (run_dir / name).exists():
            raise ExportError(f"{run_dir / name}: missing; is {run_dir} a finished run directory?")
    config = load_config(run_dir / CONFIG_FILE)
    if data_dir is not None:
        config.data.data_dir = Path(data_dir)
    dataset = prepare_split(config).dataset
    meta_path = run_dir / "meta.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.exists() else {}
    if meta.get("data_fingerprint") not in (None, dataset.fingerprint):
        raise ExportError(f"{meta_path}: the run was trained on data with fingerprint {meta['data_fingerprint']} "
                          f"but the data now has {dataset.fingerprint}; the id maps would not match the weights")
    state = load_file(str(run_dir / MODEL_FILE))
    model = MODELS.get(config.model.name).from_state(config.model, dataset.n_items, state)
    source = {"run_dir": str(run_dir.resolve()), "config_hash": meta.get("config_hash", config.config_hash())}
    final_path = run_dir / "final.json"
    if final_path.exists():
        final = json.loads(final_path.read_text(encoding="utf-8"))
        source["test_metrics"] = final.get("metrics", {}).get("test/full") or final.get("metrics", {})
    return export_model(model, config, dataset, out_dir, source)


@dataclass
class Export:
    """A loaded export: the model ready to rank, the id maps, items, users and descriptions."""

    path: Path
    manifest: dict[str, Any]
    config: RunConfig
    model: Recommender
    ranker: Ranker
    item_ids: np.ndarray  # internal id -> external id; [0] == "<pad>"
    item_index: dict[str, int]
    items: pd.DataFrame  # row k = internal id k + 1
    user_ids: list[str]
    user_index: dict[str, int]
    histories: list[np.ndarray]
    descriptions: dict[str, dict[str, Any]] = field(default_factory=dict)
    semantics: dict[str, Any] | None = None
    data_root: Path | None = None

    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def n_items(self) -> int:
        return int(self.manifest["n_items"])

    def __post_init__(self) -> None:
        # Per-item attributes, poster paths and titles as plain lists, built once: a pandas row lookup per
        # item and request cost more than ranking (about 0.1 ms each, 20 per top-10 answer).
        columns = [c for c in self.items.columns if c.startswith("attr_")]
        values = {c: self.items[c].tolist() for c in columns}
        self._attributes: list[dict[str, str]] = []
        for row in range(len(self.items)):
            self._attributes.append({c.removeprefix("attr_"): str(values[c][row]) for c in columns
                                     if not _missing(values[c][row]) and str(values[c][row]) != ""})
        self._images = [None if _missing(v) else str(v) for v in self.items["image"].tolist()]
        self._titles = [a.get("title") or self.external(i + 1) for i, a in enumerate(self._attributes)]

    def external(self, internal: int) -> str:
        return str(self.item_ids[internal])

    def attributes(self, internal: int) -> dict[str, str]:
        return dict(self._attributes[internal - 1])

    def image(self, internal: int) -> str | None:
        return self._images[internal - 1]

    def title(self, internal: int) -> str:
        return self._titles[internal - 1]


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def mmap_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file as views of one copy-on-write memory map of it.

    Pages are read on first use and shared with every other process mapping the same file; a write (none
    happens while serving) would copy only the page written. Same result as ``safetensors.torch.load_file``.
    """
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ExportError(f"{path}: too short for a safetensors file")
        header_len = int.from_bytes(prefix, "little")
        if header_len > size - 8:
            raise ExportError(f"{path}: safetensors header length {header_len} exceeds the file size {size}")
        try:
            header = json.loads(handle.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ExportError(f"{path}: safetensors header is not valid JSON: {exc}") from None
    start = 8 + header_len
    mapped = np.memmap(path, dtype=np.uint8, mode="c") if size > start else np.zeros(0, dtype=np.uint8)
    tensors: dict[str, torch.Tensor] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # frombuffer on a memmap: fine, it is copy-on-write
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            dtype = _SAFETENSORS_DTYPES.get(entry.get("dtype"))
            begin, end = entry["data_offsets"]
            if dtype is None or not 0 <= begin <= end <= size - start:
                raise ExportError(f"{path}: tensor {name!r} has an unsupported dtype or offsets out of range")
            shape = [int(n) for n in entry["shape"]]
            count = int(np.prod(shape)) if shape else 1
            if count == 0:
                tensors[name] = torch.zeros(shape, dtype=dtype)
                continue
            flat = torch.frombuffer(mapped, dtype=dtype, count=count, offset=start + begin)
            tensors[name] = flat.view(shape)
    return tensors


def verify_checksums(folder: Path) -> dict[str, Any]:
    """Read ``manifest.json`` and check every listed file's size and sha256; return the manifest."""
    manifest_path = folder / MANIFEST
    if not manifest_path.exists():
        raise ExportError(f"{manifest_path}: no such file; is {folder} an export written by `prismrec export`?")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ExportError(f"{manifest_path}: not valid JSON (line {exc.lineno}): {exc.msg}") from None
    if manifest.get("format") != EXPORT_FORMAT:
        raise ExportError(f"{manifest_path}: format {manifest.get('format')!r}, expected {EXPORT_FORMAT!r}")
    for name, entry in manifest.get("files", {}).items():
        path = folder / name
        if Path(name).name != name:
            raise ExportError(f"{manifest_path}: file name {name!r} is not a plain file name")
        if not path.is_file():
            raise ExportError(f"{path}: listed in the manifest but missing")
        if path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
            raise ExportError(f"{path}: checksum mismatch (the file changed after export or is damaged)")
    for required in (MODEL_FILE, CONFIG_FILE, ITEMS_FILE, USERS_FILE):
        if required not in manifest.get("files", {}):
            raise ExportError(f"{manifest_path}: does not list {required}")
    return manifest


def load_export(folder: Path | str, data_dir: Path | None = None, device: str = "cpu",
                index: str = "exact", mmap: bool = True) -> Export:
    """Verify and load an export; ``data_dir`` overrides where the dataset (posters) lives.

    ``mmap`` (CPU only): the model's parameters and the item tables are the memory-mapped tensors of the
    export's files, shared between processes, instead of private copies.
    """
    folder = Path(folder)
    manifest = verify_checksums(folder)
    config = load_config(folder / CONFIG_FILE)
    n_items = int(manifest["n_items"])
    mapped = mmap and device == "cpu"
    load = mmap_safetensors if mapped else (lambda p: load_file(str(p), device=device))
    state = load(folder / MODEL_FILE)
    try:
        # from_state gets private copies: a model may build its buffers *on* the given arrays and then load
        # the state into them, which would write to (and so un-share) every page of the mapping
        model = MODELS.get(config.model.name).from_state(
            config.model, n_items, {k: v.clone() for k, v in state.items()} if mapped else state)
        if mapped:  # then the mapped tensors themselves replace those copies, which are freed
            model.load_state_dict(state, assign=True)
        model = model.to(device).eval()
    except (RuntimeError, KeyError, NotImplementedError) as exc:
        raise ExportError(f"{folder / MODEL_FILE}: cannot rebuild model {config.model.name!r}: {exc}") from None
    tables = load(folder / TABLES_FILE) if (folder / TABLES_FILE).exists() else {}
    ranker = Ranker.build(model, tables, index=index)
    items = pd.read_parquet(folder / ITEMS_FILE)
    if len(items) != n_items:
        raise ExportError(f"{folder / ITEMS_FILE}: {len(items)} rows, manifest says {n_items} items")
    item_ids = np.array(["<pad>", *items["external_id"].astype(str)], dtype=object)
    users = pq.read_table(folder / USERS_FILE)
    user_ids = [str(u) for u in users.column("user_id").to_pylist()]
    histories = [np.asarray(h, dtype=np.int64) for h in users.column("history").to_pylist()]
    descriptions: dict[str, dict[str, Any]] = {}
    if (folder / DESCRIPTIONS_FILE).exists():
        frame = pd.read_parquet(folder / DESCRIPTIONS_FILE)
        for record in frame.to_dict(orient="records"):
            external = str(record.pop("external_id"))
            descriptions[external] = {k: None if v is None or (isinstance(v, float) and np.isnan(v)) else v
                                      for k, v in record.items()}
    semantics = None
    if (folder / SEMANTICS_FILE).exists():
        semantics = json.loads((folder / SEMANTICS_FILE).read_text(encoding="utf-8"))
    data_root = None
    if data_dir is not None:
        candidate = Path(data_dir) / str(manifest.get("dataset_folder", ""))
        data_root = candidate if candidate.is_dir() else Path(data_dir)
    elif manifest.get("data_root"):
        data_root = Path(manifest["data_root"])
    return Export(path=folder, manifest=manifest, config=config, model=model, ranker=ranker, item_ids=item_ids,
                  item_index={str(e): i for i, e in enumerate(item_ids) if i}, items=items, user_ids=user_ids,
                  user_index={u: i for i, u in enumerate(user_ids)}, histories=histories,
                  descriptions=descriptions, semantics=semantics,
                  data_root=data_root.resolve() if data_root is not None else None)
