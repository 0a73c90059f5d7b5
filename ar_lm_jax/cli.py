"""The shared command-line face: `--config=NAME_OR_PATH`, `--config.section.key=VALUE`, plain flags.

Every entry point in `experiments/` and `tools/` declares its own flags and calls
`run_main`, which turns bad input (`ConfigError`, `UsageError`) into one line on
stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from ar_lm_jax.config import REPO_ROOT, Config, ConfigError, apply_overrides, load_config

CONFIGS_DIR = REPO_ROOT / "experiments" / "configs"
EXIT_BAD_INPUT = 2


class UsageError(ValueError):
  """A bad command-line flag or argument (not a config key)."""


class _Parser(argparse.ArgumentParser):

  def error(self, message: str):  # argparse would print usage and exit; we want one line
    raise UsageError(message)


def make_parser(description: str, with_config: bool = True, default_config: str = "tiny") -> argparse.ArgumentParser:
  p = _Parser(description=description, allow_abbrev=False)
  if with_config:
    p.add_argument("--config", default=default_config, help="a named config in experiments/configs, a .py path or a saved config.json")
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
  args = parser.parse_args(rest)
  if not hasattr(args, "config"):
    if overrides:
      raise UsageError("this command takes no --config overrides")
    return None, args
  cfg = load_config(args.config, CONFIGS_DIR)
  return apply_overrides(cfg, overrides), args


def run_main(main: Callable[[], Any]) -> None:
  """Runs `main`, mapping bad input to exit 2 with a one-line message."""
  try:
    code = main()
  except (ConfigError, UsageError) as e:
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
