"""The bottom layer of every component's typed options: strict pydantic models, TOML in and out, overrides.

Every package may import this module and it imports no other part of prismrec. A component's options are
a :class:`StrictModel` (unknown keys are errors that name the key); a model's options subclass
:class:`ModelConfig`, whose ``name`` selects the model in :data:`prismrec.models.MODELS`. The run
configuration that assembles data, model, training and evaluation sections is :mod:`prismrec.config`, one
layer up (it validates the ``model`` section with the registered model's config class, so it imports the
models; the models import only this module).
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError


class ConfigError(ValueError):
    """A configuration problem, phrased for the person who wrote the file."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(StrictModel):
    """Base of every model's options; ``name`` selects the model in the registry."""

    name: str


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"training.lr=0.0005"`` -> ``(["training", "lr"], 0.0005)``; values are TOML literals, else strings."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    for override in overrides:
        parts, value = parse_override(override)
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {override!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for error in exc.errors():
        loc = ".".join(str(p) for p in error["loc"] if not str(p).startswith("function-"))
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown option (check the spelling; see the documented options of this section)"
        given = error.get("input")
        hidden = error["type"] in ("extra_forbidden", "missing") or isinstance(given, dict)
        shown = "" if hidden else f" (got {given!r})"
        lines.append(f"  {loc or '(top level)'}: {message}{shown}")
    return "\n".join(lines)


def read_toml(path: Path | str, what: str = "config") -> dict[str, Any]:
    """Parse a TOML file, turning a missing file or a syntax error into a :class:`ConfigError`."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{what} file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def command_line_overrides(overrides: Sequence[str] | None, data_dir: Path | None = None) -> list[str]:
    """A command's ``--set`` overrides, plus ``--data-dir`` as the ``data.data_dir`` override (applied last)."""
    combined = list(overrides or [])
    if data_dir is not None:
        combined.append(f"data.data_dir={json.dumps(str(data_dir))}")
    return combined


def read_with_overrides(path: Path | str | None, overrides: Sequence[str] = ()) -> tuple[dict[str, Any], str]:
    """A TOML file (or nothing) with ``section.key=value`` overrides applied, and where it came from."""
    data = read_toml(path) if path is not None else {}
    return apply_overrides(data, overrides), str(path) if path is not None else "command-line overrides"


ConfigModel = TypeVar("ConfigModel", bound=BaseModel)


@contextmanager
def config_errors(source: str) -> Iterator[None]:
    """Turn a validation error (or an unknown registry name) raised inside into a :class:`ConfigError` that
    names ``source`` and each bad key."""
    try:
        yield
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None
    except KeyError as exc:  # unknown registry name
        raise ConfigError(f"invalid configuration in {source}: {exc}") from None


def validate_typed(model: type[ConfigModel], data: dict[str, Any], source: str = "configuration") -> ConfigModel:
    """``data`` validated into ``model``; a :class:`ConfigError` naming ``source`` and each bad key otherwise."""
    with config_errors(source):
        return model.model_validate(data)


def load_typed_config(model: type[ConfigModel], path: Path | str | None,
                      overrides: Sequence[str] = ()) -> ConfigModel:
    """Any pydantic config model (MLLM-MSR, Speeder, ...) from TOML + overrides; errors name file and key."""
    data, source = read_with_overrides(path, overrides)
    return validate_typed(model, data, source)


def dump_toml(data: dict[str, Any]) -> str:
    """A small TOML writer for resolved configs (tables of scalars, lists and nested tables)."""

    def scalar(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, int | float):
            return repr(value)
        if isinstance(value, list):
            return "[" + ", ".join(scalar(v) for v in value) + "]"
        return json.dumps(str(value))

    out: list[str] = []

    def table(prefix: str, node: dict[str, Any]) -> None:
        simple = {k: v for k, v in node.items() if not isinstance(v, dict) and v is not None}
        nested = {k: v for k, v in node.items() if isinstance(v, dict)}
        if prefix:
            out.append(f"\n[{prefix}]")
        for key, value in simple.items():
            out.append(f"{key} = {scalar(value)}")
        for key, value in nested.items():
            table(f"{prefix}.{key}" if prefix else key, value)

    table("", data)
    return "\n".join(out).lstrip() + "\n"
