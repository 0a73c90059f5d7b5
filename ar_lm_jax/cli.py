"""The shared command-line face: `--config=NAME_OR_PATH`, `--config.section.key=VALUE`, plain flags.

Every entry point in `experiments/` and `tools/` declares its own flags and calls
`run_main`, which turns bad input (any `errors.UserError`: a config key, a flag, a
file, a checkpoint) into one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from ar_lm_jax.config import Config, ConfigError, apply_overrides, load_config, parse_value
from ar_lm_jax.errors import UserError

EXIT_BAD_INPUT = 2


class UsageError(UserError):
  """A bad command-line flag or argument (not a config key)."""


class _Parser(argparse.ArgumentParser):

  def error(self, message: str):  # argparse would print usage and exit; we want one line
    raise UsageError(message)


def make_parser(description: str, with_config: bool = True, default_config: str = "tiny") -> argparse.ArgumentParser:
  p = _Parser(description=description, allow_abbrev=False)
  if with_config:
    p.add_argument("--config", default=default_config, help="a named config (a module of ar_lm_jax/configs), a .py path or a saved config.json")
  return p


def parse_args(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> tuple[Optional[Config], argparse.Namespace]:
  """Parses flags; `--config.a.b=v` pairs are applied to the loaded config as type-checked overrides."""
  argv = list(sys.argv[1:] if argv is None else argv)
  overrides: dict[str, str] = {}
  rest = []
  i = 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith("--config."):
      key, eq, value = arg[len("--config."):].partition("=")
      if not eq:  # `--config.a.b VALUE`
        if i + 1 >= len(argv):
          raise UsageError(f"--config.{key} needs a value")
        value = argv[i + 1]
        i += 1
      overrides[key] = value
    else:
      rest.append(arg)
    i += 1
  overrides = _one_run_length(overrides)
  args = parser.parse_args(rest)
  if not hasattr(args, "config"):
    if overrides:
      raise UsageError("this command takes no --config overrides")
    return None, args
  cfg = load_config(args.config)
  return apply_overrides(cfg, overrides), args


def _one_run_length(overrides: dict[str, str]) -> dict[str, str]:
  """train.steps and train.epochs are two ways to give a run's length: the one set on the command line
  replaces the config's other (`--config=sft_tiny --config.train.steps=6` is a 6-step run); both there is an error."""
  steps, epochs = overrides.get("train.steps"), overrides.get("train.epochs")
  if steps is not None and epochs is not None:
    if parse_value(steps) != 0 and parse_value(epochs) != 0:
      raise ConfigError("train.steps and train.epochs are both set on the command line: a run's length is one of "
                        "them (train.epochs computes train.steps from the data)")
    return overrides
  if epochs is not None and parse_value(epochs) != 0:
    return {**overrides, "train.steps": "0"}  # applied after train.epochs, so each step is a valid config
  if steps is not None and parse_value(steps) != 0:
    return {**overrides, "train.epochs": "0"}
  return overrides


def run_main(main: Callable[[], Any]) -> None:
  """Runs `main`, mapping bad input (a UserError, whatever part of the library raised it) to exit 2 with a
  one-line message."""
  try:
    code = main()
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)
  sys.exit(int(code or 0))


def parse_int_list(text: str, flag: str) -> list[int]:
  try:
    return [int(x) for x in text.split(",") if x.strip()]
  except ValueError:
    raise UsageError(f"{flag}: expected comma-separated integers, got {text!r}") from None


def existing_path(text: str, flag: str) -> Path:
  p = Path(text)
  if not p.exists():
    raise UsageError(f"{flag}: {text} does not exist")
  return p


# What a run writes in its workdir (loop.py); a failed start that wrote nothing else is removed again.
RUN_OUTPUTS = ("config.json", "checkpoints", "metrics.jsonl", "tensorboard")


def check_workdir(path: str | Path) -> bool:
  """Refuses (UsageError) a --workdir that is a file, or a non-empty directory that is not one of our runs
  (a Hugging Face export, a data folder: training would overwrite its config.json). Returns whether it exists.

  A run of ours: its config.json is a run config (sections model, train, checkpoint), or, without one,
  it holds our checkpoints/ or metrics.jsonl."""
  p = Path(path)
  if p.exists() and not p.is_dir():
    raise UsageError(f"--workdir: {p} exists and is not a directory")
  if not p.is_dir():
    return False
  try:
    entries = {e.name for e in p.iterdir()}
  except OSError as e:
    raise UsageError(f"--workdir: cannot read {p} ({e.strerror or e})") from None
  if not entries:
    return True
  if "config.json" in entries:
    try:
      saved = json.loads((p / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
      saved = None
    if isinstance(saved, dict) and {"model", "train", "checkpoint"} <= set(saved) and "model_type" not in saved:
      return True
    raise UsageError(f"--workdir: {p} holds a config.json that is not a run config of ours (a Hugging Face export?); "
                     "training would overwrite it: give a new or empty directory, or one of our runs")
  if entries & {"checkpoints", "metrics.jsonl"}:
    return True
  raise UsageError(f"--workdir: {p} is not empty and not a run of ours ({', '.join(sorted(entries)[:3])}"
                   f"{', ...' if len(entries) > 3 else ''}): give a new or empty directory, or one of our runs")


@contextlib.contextmanager
def train_workdir(path: str | Path, is_main: bool = True) -> Iterator[Path]:
  """`check_workdir`, then creates it; when the block raises before anything was trained or saved (a failed
  start: bad data, a bad tokenizer), process 0 removes what the start wrote, so no empty run is left behind.
  A directory that existed before is never removed, only what this start added to an empty one."""
  p = Path(path)
  existed = check_workdir(p)
  was_empty = existed and not any(p.iterdir())
  try:
    p.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise UsageError(f"--workdir: cannot create {p} ({e.strerror or e})") from None
  import jax
  if jax.process_count() > 1:  # no process writes into it before every process has checked it (same answer)
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("ar_lm_jax_workdir_checked")
  try:
    yield p
  except BaseException:
    if is_main and (not existed or was_empty) and not _trained_anything(p):
      if existed:
        for name in RUN_OUTPUTS:
          q = p / name
          shutil.rmtree(q, ignore_errors=True) if q.is_dir() else q.unlink(missing_ok=True)
      else:
        shutil.rmtree(p, ignore_errors=True)
    raise


def _trained_anything(p: Path) -> bool:
  """Whether a checkpoint step or a metrics row exists: then a failure is a failed run, kept for inspection."""
  metrics = p / "metrics.jsonl"
  if metrics.is_file() and metrics.stat().st_size > 0:
    return True
  ckpts = p / "checkpoints"
  return ckpts.is_dir() and any(q.name[0].isdigit() for q in ckpts.iterdir())
