"""Typed config: overrides are parsed as JSON and type-checked; bad keys and values name the key."""

import dataclasses
import json
from pathlib import Path

import pytest

from ar_lm_jax.config import (Config, ConfigError, SourceConfig, apply_overrides, dumps, from_dict, load_config,
                              parse_value)


def test_parse_value_json_else_string():
  assert parse_value("3") == 3 and parse_value("2.5e-4") == 2.5e-4 and parse_value("true") is True
  assert parse_value("[1, 2]") == [1, 2] and parse_value('{"a": 1}') == {"a": 1} and parse_value("null") is None
  assert parse_value("bfloat16") == "bfloat16" and parse_value("runs/x") == "runs/x"


def test_overrides_are_typed():
  cfg = load_config("tiny")
  cfg = apply_overrides(cfg, {"train.steps": "30", "optim.weight_decay": "0", "model.dtype": "bfloat16",
                              "checkpoint.async_save": "false"})
  assert cfg.train.steps == 30 and cfg.optim.weight_decay == 0.0 and isinstance(cfg.optim.weight_decay, float)
  assert cfg.model.dtype == "bfloat16" and cfg.checkpoint.async_save is False


def test_sources_from_json_list():
  cfg = load_config("tiny")
  cfg = apply_overrides(cfg, {"data.sources": '[{"path": "a.jsonl", "lang": "en", "weight": 0.8},'
                                              ' {"path": "b/*.parquet", "lang": "ar", "weight": 0.2, "text_field": "body"}]'})
  assert cfg.data.sources == (SourceConfig("a.jsonl", "en", 0.8), SourceConfig("b/*.parquet", "ar", 0.2, text_field="body"))


@pytest.mark.parametrize("key,value,needle", [
    ("train.stepz", "3", "train.stepz"),
    ("nosuch.key", "3", "nosuch"),
    ("train.steps", "abc", "train.steps"),
    ("train.steps", "1.5", "train.steps"),
    ("train.progress", "1", "train.progress"),
    ("model.dtype", "float16", "model.dtype"),
    ("model.num_heads", "5", "model.hidden_size"),
    ("data.sources", '[{"path": "a", "lang": "en", "wieght": 1}]', "data.sources[0].wieght"),
    ("data.sources", '[{"lang": "en"}]', "data.sources[0]"),
    ("train.steps.x", "1", "train.steps.x"),
])
def test_bad_overrides_name_the_key(key, value, needle):
  cfg = load_config("tiny")
  with pytest.raises(ConfigError) as e:
    apply_overrides(cfg, {key: value})
  assert needle in str(e.value) and "\n" not in str(e.value)


def test_impossible_combinations():
  cfg = load_config("tiny")
  with pytest.raises(ConfigError, match="data.seq_len"):
    apply_overrides(cfg, {"data.seq_len": "100000"})
  with pytest.raises(ConfigError, match="grad_accum_steps"):
    apply_overrides(cfg, {"optim.grad_accum_steps": "3"})
  with pytest.raises(ConfigError, match="train.loss_chunk_size"):
    apply_overrides(cfg, {"train.loss_chunk_size": "24"})


def test_json_round_trip(tmp_path):
  cfg = apply_overrides(load_config("tiny"), {"train.steps": "7"})
  path = tmp_path / "config.json"
  path.write_text(dumps(cfg))
  again = load_config(str(path))
  assert again == cfg
  assert from_dict(Config, json.loads(dumps(cfg))) == cfg


def test_unknown_config_name_lists_known():
  with pytest.raises(ConfigError, match="tiny"):
    load_config("no-such-config")


def test_named_configs_and_the_sample_are_package_data(tmp_path, monkeypatch):
  """Every named config loads by name from any directory, and the sample it reads lies inside the package."""
  import ar_lm_jax
  from ar_lm_jax.config import SAMPLE_DIR, named_configs
  package = Path(ar_lm_jax.__file__).parent
  assert SAMPLE_DIR.parent == package and sorted(p.name for p in SAMPLE_DIR.glob("*.jsonl"))
  monkeypatch.chdir(tmp_path)  # nothing resolves against the working directory
  names = named_configs()
  assert {"tiny", "sft_tiny", "ar_stablelm_2_1_6b"} <= set(names)
  for name in names:
    cfg = load_config(name)
    for src in cfg.data.sources + cfg.data.eval_sources:
      assert Path(src.path).is_file() and Path(src.path).parent == SAMPLE_DIR, (name, src.path)
  assert load_config("sft-tiny").name == "sft_tiny"  # a dash names the module with an underscore


def test_config_paths_are_explicit(tmp_path):
  """A .py of one's own and a saved config.json load from their paths; a missing path says so."""
  own = tmp_path / "mine.py"
  own.write_text("from ar_lm_jax.config import load_config\n\n"
                 "def get_config():\n  return load_config('tiny').replace(name='mine')\n")
  assert load_config(str(own)).name == "mine"
  for missing in ("nope.py", "nope.json"):
    with pytest.raises(ConfigError, match="does not exist"):
      load_config(str(tmp_path / missing))


def test_every_field_is_commented():
  """Each config field carries a one-line comment in config.py (the declaration is the documentation)."""
  import inspect
  from ar_lm_jax import config as config_lib
  source = inspect.getsource(config_lib)
  for cls in (config_lib.ModelConfig, config_lib.DataConfig, config_lib.SourceConfig, config_lib.OptimConfig,
              config_lib.PhaseConfig, config_lib.MeshConfig, config_lib.TrainConfig, config_lib.CheckpointConfig,
              config_lib.MixtureStage):
    for f in dataclasses.fields(cls):
      lines = [l for l in source.splitlines() if l.strip().startswith(f"{f.name}:")]
      assert lines and any("#" in l for l in lines), f"{cls.__name__}.{f.name} has no comment"
