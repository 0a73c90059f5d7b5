"""`train.epochs`: a run's length as passes over the fine-tuning data, turned into `train.steps` at start-up.

The schedule needs the number of steps up front, so `resolve(cfg)` counts, before training, the
tokens one pass over the *epoch sources* gives with the run's tokenizer, chat template and packing
(the same block functions the pipeline uses, so the same documents are kept and skipped):

- the epoch sources are the `format: "chat"` sources with a weight > 0, when there are any (the
  fine-tuning data; plain-text sources mixed in with them are replay and do not count); otherwise
  every source with a weight > 0 (E epochs of a fixed corpus);
- packing is concat-then-split with no padding, and every stream continues into its next pass, so
  a pass over sources of T tokens is exactly T / seq_len rows;
- the global mixture gives the epoch sources `share` of every batch's `batch_size` rows (the
  normalized sum of their weights, to within one row per step), so

      steps = ceil(E x T / (seq_len x batch_size x share)).

With several epoch sources, E counts passes over them taken together: the run reads E times their
combined rows from them. Each one's own passes are printed at start-up; they are all E when the
weights are proportional to the sources' token counts, otherwise the smaller ones repeat more.

Counting reads the data once without training: cheap for SFT-sized sets, not for a pre-training
corpus, so streamed epoch sources larger than `MAX_COUNT_BYTES` on disk are an error (set
train.steps instead); pre-tokenized ArrayRecord sources are counted from their manifest.

A resumed run (its workdir holds a checkpoint step) takes the steps recorded in its config.json when
the epochs and the data config are those it was computed for, so resuming never depends on counting
again (and the pipeline's file digests refuse changed data anyway).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Optional

from ar_lm_jax import chat, data_sources
from ar_lm_jax.config import Config, ConfigError, from_dict, to_dict
from ar_lm_jax.tokenizer import load_tokenizer

MAX_COUNT_BYTES = 1 << 30  # streamed bytes on disk counted at start-up: a few minutes of tokenizing at most
_DOCS_PER_CALL = 256  # documents handed to a block function at once


@dataclasses.dataclass(frozen=True)
class EpochPlan:
  epochs: float
  steps: int
  sources: tuple[int, ...]  # indices in data.sources of the epoch sources
  tokens: tuple[int, ...]  # tokens of one pass over each epoch source (EOS included for plain text)
  share: float  # fraction of every batch's rows drawn from the epoch sources
  recorded: Optional[str] = None  # the config.json the steps were taken from (a resume), else None

  def describe(self, cfg: Config) -> str:
    if self.recorded:
      return (f"train.epochs={self.epochs:g}: train.steps={self.steps}, as recorded in {self.recorded} "
              "when the run started")
    d = cfg.data
    L, B = d.seq_len, d.batch_size
    rows = sum(self.tokens) / L
    weights = [s.weight for s in d.sources]
    per_source = ", ".join(
        f"{k}:{d.sources[k].lang} {self.steps * B * weights[k] / sum(weights) * L / max(t, 1):.2f}"
        for k, t in zip(self.sources, self.tokens))
    kind = "chat sources" if any(d.sources[k].format == "chat" for k in self.sources) else "sources"
    small = ""
    if self.epochs * rows < 0.5 * self.share * B:  # the step count was rounded up from well below 1
      small = f"; {self.epochs:g} passes are under half a step, so the one step repeats the data far more often"
    return (f"train.epochs={self.epochs:g}: train.steps={self.steps} (one pass over the {kind} "
            f"{list(self.sources)} is {sum(self.tokens)} tokens = {rows:.2f} rows of {L}, at {self.share * B:.2f} "
            f"of the {B} rows of a batch; passes per source at the end: {per_source}{small})")


def epoch_sources(cfg: Config) -> list[int]:
  srcs = cfg.data.sources
  chat_ones = [k for k, s in enumerate(srcs) if s.format == "chat" and s.weight > 0]
  return chat_ones or [k for k, s in enumerate(srcs) if s.weight > 0]


def _check_combination(cfg: Config) -> None:
  if cfg.data.stages:
    raise ConfigError("train.epochs: not with data.stages (the epoch sources' share of a batch changes at given "
                      "steps, so epochs are no fixed number of steps); set train.steps instead")


def _streamed_bytes(src: data_sources.ResolvedSource) -> int:
  return sum(os.path.getsize(f) for f in src.files)


def count_tokens(cfg: Config, k: int, src: data_sources.ResolvedSource, tokenizer: Any) -> int:
  """Tokens one pass over source `k` packs (what its block stream yields per pass, over all virtual shards)."""
  if src.format == "arrayrecord":
    return _arrayrecord_tokens(src)
  if src.format == "chat":
    block_fn = data_sources.ChatTokenizeBlock(tokenizer, cfg.data.chat_template, cfg.data.loss_on)
  else:
    block_fn = data_sources.TokenizeBlock(tokenizer)
  total, batch = 0, []
  for doc in data_sources.iter_documents(src):
    batch.append(doc)
    if len(batch) >= _DOCS_PER_CALL:
      total += int(block_fn(batch)["tokens"].size)
      batch = []
  if batch:
    total += int(block_fn(batch)["tokens"].size)
  return total


def _arrayrecord_tokens(src: data_sources.ResolvedSource) -> int:
  """Pre-tokenized shards: tokens plus one EOS per document, from the manifests where they list the shards."""
  by_dir: dict[str, list[str]] = {}
  for f in src.files:
    by_dir.setdefault(os.path.dirname(f), []).append(os.path.basename(f))
  total = 0
  for directory, names in by_dir.items():
    manifest = data_sources.read_manifest(directory) or {}
    shards = manifest.get("shards", {})
    for name in names:
      if name in shards:
        total += int(shards[name]["tokens"]) + int(shards[name]["documents"])
      else:  # shards without a manifest entry: read their records' lengths
        import grain  # pylint: disable=import-outside-toplevel
        records = grain.sources.ArrayRecordDataSource([os.path.join(directory, name)])
        for i in range(len(records)):
          n = len(records[i])
          if n and n % data_sources.RECORD_DTYPE.itemsize == 0:
            total += n // data_sources.RECORD_DTYPE.itemsize + 1
  return total


def plan(cfg: Config) -> EpochPlan:
  """Counts one pass over the epoch sources and computes train.steps for cfg.train.epochs (> 0)."""
  _check_combination(cfg)
  d = cfg.data
  tokenizer = load_tokenizer(d.tokenizer_path)
  picked = epoch_sources(cfg)
  resolved = [data_sources.resolve_source(d.sources[k], k, tokenizer) for k in picked]
  streamed = sum(_streamed_bytes(r) for r in resolved if r.format != "arrayrecord")
  if streamed > MAX_COUNT_BYTES:
    raise ConfigError(f"train.epochs: counting an epoch means tokenizing sources {picked} at start-up, "
                      f"{streamed / 2**30:.1f} GiB on disk, over the {MAX_COUNT_BYTES / 2**30:.0f} GiB bound; set "
                      f"train.steps instead (docs/finetuning.md, Epochs), or pre-tokenize plain text with "
                      f"tools.prepare_data (counted from its manifest)")
  if any(r.format == "chat" for r in resolved):
    try:
      chat.check_template(d.chat_template, tokenizer)
    except chat.ChatError as e:
      raise ConfigError(f"data.chat_template: {e}") from None
  tokens = [count_tokens(cfg, k, r, tokenizer) for k, r in zip(picked, resolved)]
  if sum(tokens) == 0:
    raise ConfigError(f"train.epochs: sources {picked} hold no usable document, so an epoch is no steps")
  weights = [s.weight for s in d.sources]
  share = sum(weights[k] for k in picked) / sum(weights)
  exact = cfg.train.epochs * sum(tokens) / (d.seq_len * d.batch_size * share)
  steps = max(1, math.ceil(exact - 1e-9))  # (a float product that should be whole must not gain a step)
  return EpochPlan(cfg.train.epochs, steps, tuple(picked), tuple(tokens), share)


def _recorded(cfg: Config, workdir: Optional[str | Path]) -> Optional[tuple[int, str]]:
  """(steps, path) from the config.json of a run to resume, computed for the same epochs and data, else None."""
  if workdir is None:
    return None
  ckpts = Path(workdir) / "checkpoints"
  if not ckpts.is_dir() or not any(p.name.isdigit() for p in ckpts.iterdir()):
    return None  # nothing to resume: count (the files may have changed since that config.json was written)
  path = Path(workdir) / "config.json"
  try:
    saved = from_dict(Config, json.loads(path.read_text()))
  except (OSError, ValueError):  # no run there yet, or not one of ours (the workdir check says so later)
    return None
  if (saved.train.epochs == cfg.train.epochs and saved.train.steps > 0
      and to_dict(saved.data) == to_dict(cfg.data)):
    return saved.train.steps, str(path)
  return None


def resolve(cfg: Config, workdir: Optional[str | Path] = None) -> tuple[Config, Optional[EpochPlan]]:
  """cfg with train.steps computed from train.epochs (unchanged, and no plan, when epochs is 0).

  A cfg that sets both (train.steps > 0 and train.epochs > 0) is one recorded by an earlier run
  (config.json) when its steps are what the epochs give; anything else is a ConfigError.
  """
  t = cfg.train
  if not t.epochs:
    return cfg, None
  _check_combination(cfg)
  recorded = _recorded(cfg, workdir)
  if recorded is not None and t.steps in (0, recorded[0]):
    steps, path = recorded
    picked = epoch_sources(cfg)
    p = EpochPlan(t.epochs, steps, tuple(picked), (), 0.0, recorded=path)
    return cfg.replace(train=dataclasses.replace(t, steps=steps)), p
  p = plan(cfg)
  if t.steps and t.steps != p.steps:
    raise ConfigError(f"train.steps={t.steps} and train.epochs={t.epochs:g} are both set ({t.epochs:g} epochs of "
                      f"this data are {p.steps} steps): set one of them (train.steps=0 computes it from train.epochs)")
  return cfg.replace(train=dataclasses.replace(t, steps=p.steps)), p
