"""Serving: self-contained (memory-mapped) exports, fast top-K, explanations, the HTTP API with the explorer page,
its limits, metrics and worker processes, and batch scoring."""

from prismrec.serving.export import Export, ExportError, export_model, export_run, load_export
from prismrec.serving.inference import Ranker, TopK

__all__ = ["Export", "ExportError", "Ranker", "TopK", "export_model", "export_run", "load_export"]
