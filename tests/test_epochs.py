"""train.epochs: steps counted from the data at start-up, the E passes the pipeline then reads, the recorded
steps of a resumed run, the command line's one length, and the nonsense combinations (one line, exit 2)."""

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ar_lm_jax import chat, cli, data, epochs
from ar_lm_jax.config import SAMPLE_DIR, ConfigError, MixtureStage, dumps, load_config

REPO = Path(__file__).resolve().parents[1]


def sft_tiny(**train):
  cfg = load_config("sft_tiny")
  return cfg.replace(train=dataclasses.replace(cfg.train, **train)) if train else cfg


def chat_tokens(path):
  """Tokens of a chat file's conversations, rendered one by one (what one pass packs; no EOS after a conversation)."""
  total = 0
  for line in Path(path).read_text().splitlines():
    try:
      total += len(chat.render(chat.messages_of(json.loads(line)))[0])
    except chat.ChatError:
      pass
  return total


def test_sft_tiny_is_30_epochs_counted_from_its_conversations():
  cfg = sft_tiny()
  assert cfg.train.epochs == 30 and cfg.train.steps == 0
  resolved, plan = epochs.resolve(cfg)
  T = chat_tokens(SAMPLE_DIR / "chat_train.jsonl")
  assert plan.sources == (0,) and plan.tokens == (T,) and plan.share == pytest.approx(0.9)
  assert resolved.train.steps == plan.steps == math.ceil(30 * T / (256 * 8 * 0.9)) == 29
  assert resolved.train.epochs == 30
  assert "train.steps=29" in plan.describe(resolved)
  again, _ = epochs.resolve(resolved)  # a recorded config (both set, consistent) is accepted as it is
  assert again == resolved


def test_the_pipeline_reads_the_epochs_in_the_computed_steps():
  # Small rows and batches, so that many steps are cheap: the chat rows read over the run cover E passes,
  # and one step fewer would not.
  cfg = sft_tiny(epochs=3.0)
  cfg = cfg.replace(data=dataclasses.replace(cfg.data, seq_len=64, batch_size=4, virtual_shards=1, prefetch=0))
  resolved, plan = epochs.resolve(cfg)
  T = plan.tokens[0]
  it = data.make_train_iterator(resolved.data, seed=0)
  chat_tokens_read = []
  for _ in range(resolved.train.steps):
    next(it)
    chat_tokens_read.append(it.stats()["data/tokens_chat"])
  it.close()
  assert chat_tokens_read[-1] >= 3 * T > chat_tokens_read[-2]


def test_several_chat_sources_count_together_and_replay_does_not():
  cfg = sft_tiny(epochs=2.0)
  src = cfg.data.sources
  two = (src[0], dataclasses.replace(src[0], path=str(SAMPLE_DIR / "chat_valid.jsonl"), weight=0.3)) + src[1:]
  cfg = cfg.replace(data=dataclasses.replace(cfg.data, sources=two))
  resolved, plan = epochs.resolve(cfg)
  T0, T1 = chat_tokens(SAMPLE_DIR / "chat_train.jsonl"), chat_tokens(SAMPLE_DIR / "chat_valid.jsonl")
  assert plan.sources == (0, 1) and plan.tokens == (T0, T1)
  share = 1.2 / 1.3
  assert plan.share == pytest.approx(share)
  assert resolved.train.steps == math.ceil(2 * (T0 + T1) / (256 * 8 * share))
  # Without chat sources every weighted source is an epoch source (epochs of a fixed corpus).
  text_only = cfg.replace(data=dataclasses.replace(cfg.data, sources=src[1:]))
  assert epochs.epoch_sources(text_only) == [0, 1]


def test_nonsense_combinations_are_config_errors():
  with pytest.raises(ConfigError, match=r"train.steps=5 and train.epochs=30 are both set \(30 epochs of this data are 29 steps\)"):
    epochs.resolve(sft_tiny(steps=5))
  staged = sft_tiny()
  staged = staged.replace(data=dataclasses.replace(staged.data, stages=(MixtureStage(10, {"chat": 1.0, "en": 0.0, "ar": 0.0}),)))
  with pytest.raises(ConfigError, match="train.epochs: not with data.stages"):
    epochs.resolve(staged)
  with pytest.raises(ConfigError, match="train.epochs: must be a number >= 0"):
    sft_tiny(epochs=-1.0)
  with pytest.raises(ConfigError, match="train.steps: must be >= 1 .* or 0 with train.epochs > 0"):
    sft_tiny(epochs=0.0)


def test_a_source_too_big_to_count_is_refused(monkeypatch):
  monkeypatch.setattr(epochs, "MAX_COUNT_BYTES", 1000)
  with pytest.raises(ConfigError, match=r"train.epochs: counting an epoch means tokenizing sources \[0\] .* set train.steps instead"):
    epochs.resolve(sft_tiny())


def test_a_resumed_run_takes_the_recorded_steps(tmp_path, monkeypatch):
  resolved, _ = epochs.resolve(sft_tiny())
  (tmp_path / "config.json").write_text(dumps(resolved))
  assert epochs.resolve(sft_tiny(), tmp_path)[1].recorded is None  # no checkpoint yet: nothing to resume, count
  (tmp_path / "checkpoints" / "10").mkdir(parents=True)
  monkeypatch.setattr(epochs, "plan", lambda cfg: pytest.fail("a resume must not count again"))
  again, plan = epochs.resolve(sft_tiny(), tmp_path)
  assert again.train.steps == 29 and plan.recorded == str(tmp_path / "config.json")
  assert "as recorded in" in plan.describe(again)
  # Other epochs (or other data) count again.
  monkeypatch.undo()
  other, plan = epochs.resolve(sft_tiny(epochs=60.0), tmp_path)
  assert plan.recorded is None and other.train.steps == 58


def test_the_command_line_gives_one_length():
  parser = cli.make_parser("test")
  cfg, _ = cli.parse_args(parser, ["--config=sft_tiny", "--config.train.steps=6"])
  assert (cfg.train.steps, cfg.train.epochs) == (6, 0)  # the command line's steps replace the recipe's epochs
  cfg, _ = cli.parse_args(parser, ["--config=tiny", "--config.train.epochs=2"])
  assert (cfg.train.steps, cfg.train.epochs) == (0, 2)
  with pytest.raises(ConfigError, match="train.steps and train.epochs are both set on the command line"):
    cli.parse_args(parser, ["--config=sft_tiny", "--config.train.steps=6", "--config.train.epochs=2"])


def test_both_on_the_command_line_exit_2_with_one_line():
  proc = subprocess.run([sys.executable, "-m", "experiments.train", "--config=sft_tiny", "--config.train.steps=6",
                         "--config.train.epochs=2", "--dry_run"], cwd=REPO, capture_output=True, text=True, timeout=120,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == ["error: train.steps and train.epochs are both set on the command line: "
                                              "a run's length is one of them (train.epochs computes train.steps from the data)"]
