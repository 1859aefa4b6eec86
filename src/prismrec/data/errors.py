"""Errors for bad input data: always name the file, and the line where there is one."""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """A problem with a user's data file: what is wrong and where."""

    def __init__(self, message: str, path: Path | str | None = None, line: int | None = None) -> None:
        self.message = message
        self.path = Path(path) if path is not None else None
        self.line = line
        where = ""
        if self.path is not None:
            where = f"{self.path}"
            if line is not None:
                where += f", line {line}"
            where += ": "
        super().__init__(f"{where}{message}")


class DatasetNotFoundError(DataError):
    """The dataset folder could not be found in any of the places we look."""
