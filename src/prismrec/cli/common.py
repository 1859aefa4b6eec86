"""Pieces several command modules share (tables of metrics)."""

from __future__ import annotations

from rich.table import Table


def metrics_table(title: str, final: dict[str, dict[str, float]],
                  names: tuple[str, ...] = ("hit@10", "ndcg@10")) -> Table:
    table = Table(title=title)
    table.add_column("split / mode")
    for name in names:
        table.add_column(name, justify="right")
    for key, metrics in final.items():
        table.add_row(key, *(f"{metrics[n]:.4f}" for n in names))
    return table
