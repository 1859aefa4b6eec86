from __future__ import annotations

from pathlib import Path

import pytest

from prismrec.config import load_config
from prismrec.options import ConfigError, dump_toml, parse_override

REPO = Path(__file__).resolve().parents[1]


def test_example_config_loads_and_overrides():
    cfg = load_config(REPO / "configs/movielens_sasrec.toml", ["training.lr=0.0005", "model.dropout=0.5"])
    assert cfg.training.lr == 0.0005
    assert cfg.model.dropout == 0.5
    assert cfg.model.hidden_size == 128


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"training\.lrr: unknown option"):
        load_config(REPO / "configs/movielens_sasrec.toml", ["training.lrr=0.1"])
    with pytest.raises(ConfigError, match=r"model\.hiden_size: unknown option"):
        load_config(REPO / "configs/movielens_sasrec.toml", ["model.hiden_size=64"])


def test_mistyped_value_is_named():
    with pytest.raises(ConfigError, match=r"training\.batch_size: .*integer.*'many'"):
        load_config(REPO / "configs/movielens_sasrec.toml", ["training.batch_size=many"])
    with pytest.raises(ConfigError, match=r"training\.loss"):
        load_config(REPO / "configs/movielens_sasrec.toml", ["training.loss='hinge'"])


def test_unknown_model_lists_known_ones():
    with pytest.raises(ConfigError, match=r"unknown model 'sasrek'; known: .*sasrec"):
        load_config(None, ["model.name=sasrek"])


def test_broken_toml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[training\nlr = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")


def test_override_parsing_and_roundtrip(tmp_path):
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a.b=abc") == (["a", "b"], "abc")
    assert parse_override("evaluation.ks=[1, 5]") == (["evaluation", "ks"], [1, 5])
    cfg = load_config(REPO / "configs/movielens_sasrec.toml")
    path = tmp_path / "resolved.toml"
    path.write_text(dump_toml(cfg.to_dict()))
    again = load_config(path)
    assert again.config_hash() == cfg.config_hash()
