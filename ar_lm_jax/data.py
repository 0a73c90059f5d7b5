"""The training input pipeline: sources -> tokenized blocks -> packed rows -> staged mixture -> batches.

    source 0 ─ read/shuffle ─ tokenize ─ pack ─┐
    source 1 ─ read/shuffle ─ tokenize ─ pack ─┼─ grain mix by weight (per stage) ─ batch ─ prefetch thread
    ...                                        ┘

Each source is packed into rows on its own (`packing`: concat-then-split, no padding) and whole
rows are then mixed with grain's `IterDataset.mix`, so the token share of each language equals
its configured weight up to one row. Staged mixtures (weights that change at given train steps,
as in Llama 3 and OLMo) build a new grain mixture at each stage boundary over the same live
source iterators, so every source simply continues where it was.

A batch is one train step: [data.batch_size // process_count, seq_len] rows of this process.
`worker_count > 0` moves each source's reading, tokenizing and packing into that many grain
worker processes (`mp_prefetch`); results are deterministic for a given worker count.

Checkpointing: `TrainIterator.get_state()` is a small JSON-serializable dict (grain states plus
the metric counters) and `set_state` reproduces exactly the batches that would have followed. It
is a `grain.DatasetIterator`, so orbax can save it per process with
`grain.checkpoint.CheckpointSave(iterator)` / `grain.checkpoint.CheckpointRestore(iterator)`
(one `process_<i>-of-<n>.json` per process); `ocp.args.JsonSave(iterator.get_state())` also
works but writes from the primary process only, so it is right for single-process runs only.
"""

from __future__ import annotations

import atexit
import bisect
import gc
import time
import weakref
from typing import Any, Optional

import grain
import numpy as np
from absl import flags as absl_flags

from ar_lm_jax import data_sources
from ar_lm_jax.config import ConfigError, DataConfig
from ar_lm_jax.data_sources import SKIP_REASONS
from ar_lm_jax.packing import PackIterDataset
from ar_lm_jax.tokenizer import load_tokenizer

BATCH_KEYS = ("tokens", "segment_ids", "positions")


def _source_seed(seed: int, index: int) -> int:
  # grain wants shuffle seeds in [0, 2**32); window shuffle adds the window index to it.
  return int(np.random.SeedSequence([seed % 2**32, index]).generate_state(1)[0] >> 1)


def stage_weights(cfg: DataConfig) -> list[tuple[int, list[float]]]:
  """(start step, per-source weight) for every stage; stage 0 starts at step 0."""
  base = [s.weight for s in cfg.sources]
  stages = [] if cfg.stages and cfg.stages[0].start_step == 0 else [(0, base)]
  for st in cfg.stages:
    weights = []
    for s in cfg.sources:
      same = [t.weight for t in cfg.sources if t.lang == s.lang]
      share = s.weight / sum(same) if sum(same) > 0 else 1 / len(same)
      weights.append(float(st.weights.get(s.lang, 0.0)) * share)
    stages.append((st.start_step, weights))
  return stages


def language_shares(cfg: DataConfig, weights: list[float]) -> dict[str, float]:
  total = sum(weights)
  shares: dict[str, float] = {}
  for s, w in zip(cfg.sources, weights):
    shares[s.lang] = shares.get(s.lang, 0.0) + w / total
  return shares


class _LentIterator(grain.DatasetIterator):
  """A source iterator lent to one grain mixture: everything is forwarded but `close`.

  A mixture that is replaced (at a stage change or a restore) is garbage, and grain closes a
  garbage iterator's parents; the sources must outlive it, so their owner closes them.
  """

  def __init__(self, iterator: grain.DatasetIterator):
    super().__init__(iterator)

  def __next__(self) -> Any:
    return next(self._parent)

  def get_state(self) -> dict[str, Any]:
    return self._parent.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state)

  def close(self) -> None:
    pass


class _LiveIterDataset(grain.IterDataset):
  """Hands an iterator that already exists to grain's mix, which then continues it where it is."""

  def __init__(self, iterator: grain.DatasetIterator):
    super().__init__()
    self._iterator = iterator

  def __iter__(self) -> grain.DatasetIterator:
    return _LentIterator(self._iterator)


class _StagedMixIterator(grain.DatasetIterator):
  """Rows mixed by grain's `IterDataset.mix`, with weights that change at given row counts.

  Each source's iterator lives for the whole run; a stage change only builds a new grain
  mixture over the same iterators, so no source is re-opened or re-read.
  """

  def __init__(self, rows: dict[str, grain.IterDataset], stages: list[tuple[int, dict[str, float]]]):
    super().__init__()
    self._rows, self._stages = rows, stages
    self._starts = [start for start, _ in stages]
    self._row = 0
    self._iterators: Optional[dict[str, grain.DatasetIterator]] = None  # per source, made on first use
    self._stage = -1
    self._mix: Optional[grain.DatasetIterator] = None

  def _sources(self) -> dict[str, grain.DatasetIterator]:
    if self._iterators is None:
      self._iterators = {k: ds.__iter__() for k, ds in self._rows.items()}
    return self._iterators

  def _open(self, stage: int) -> None:
    start, weights = self._stages[stage]
    weights = {k: w for k, w in weights.items() if w > 0}  # grain's mix takes positive weights only
    sources = self._sources()
    mix = grain.IterDataset.mix({k: _LiveIterDataset(sources[k]) for k in weights}, weights).__iter__()
    # Sources keep their own positions; only the mixture's own counter is restored.
    mix.set_state({"parents": {}, "index": self._row - start, "stop": False})
    self._mix, self._stage = mix, stage

  def __next__(self) -> dict[str, np.ndarray]:
    stage = bisect.bisect_right(self._starts, self._row) - 1
    if stage != self._stage:
      self._open(stage)
    row = next(self._mix)
    self._row += 1
    return row

  def get_state(self) -> dict[str, Any]:
    return {"row": self._row, "sources": {k: it.get_state() for k, it in self._sources().items()}}

  def set_state(self, state: dict[str, Any]) -> None:
    for k, it in self._sources().items():
      if k in state["sources"]:
        it.set_state(state["sources"][k])
    self._row = state["row"]
    self._mix, self._stage = None, -1

  def start_prefetch(self) -> None:
    for it in self._sources().values():
      it.start_prefetch()

  def close(self) -> None:
    for it in (self._iterators or {}).values():
      it.close()
    super().close()


class _StagedMixIterDataset(grain.IterDataset):

  def __init__(self, rows: dict[str, grain.IterDataset], stages: list[tuple[int, dict[str, float]]]):
    super().__init__(list(rows.values()))
    self._rows, self._stages = rows, stages

  def __iter__(self) -> _StagedMixIterator:
    return _StagedMixIterator(self._rows, self._stages)


class TrainIterator(grain.DatasetIterator):
  """Batches `{"tokens", "segment_ids", "positions"}` (int32 [B, T]) for one process, with metrics.

  `get_state()`/`set_state()` resume exactly; `stats()` reports the counters so far (they are part
  of the state, so they continue across restarts).
  """

  def __init__(self, parent: grain.DatasetIterator, cfg: DataConfig, stages: list[tuple[int, list[float]]]):
    super().__init__(parent)
    self._cfg, self._stages = cfg, stages
    self._langs = [s.lang for s in cfg.sources]
    self._step = 0
    self._tokens = np.zeros(len(cfg.sources), np.int64)  # non-padding tokens per source
    self._padding = 0
    self._skipped = np.zeros(len(SKIP_REASONS), np.int64)

  @property
  def step(self) -> int:
    """The number of batches yielded so far (the train step the next batch belongs to)."""
    return self._step

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._parent)
    real_B = (batch["segment_ids"] > 0).sum(axis=1)
    self._tokens += np.bincount(batch["source"], weights=real_B, minlength=len(self._langs)).astype(np.int64)
    self._padding += int(batch["segment_ids"].size - real_B.sum())
    self._skipped += batch["skipped"].sum(axis=0)
    self._step += 1
    return {k: batch[k] for k in BATCH_KEYS}

  def get_state(self) -> dict[str, Any]:
    return {
        "pipeline": self._parent.get_state(),
        "step": self._step,
        "tokens": [int(x) for x in self._tokens],
        "padding": self._padding,
        "skipped": {r: int(x) for r, x in zip(SKIP_REASONS, self._skipped)},
    }

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["pipeline"])
    self._step = int(state["step"])
    self._tokens = np.array(state["tokens"], np.int64)
    self._padding = int(state["padding"])
    self._skipped = np.array([state["skipped"].get(r, 0) for r in SKIP_REASONS], np.int64)

  def configured_shares(self, step: Optional[int] = None) -> dict[str, float]:
    """Per-language weights in force at `step` (default: the next batch's step), normalized."""
    step = self._step if step is None else step
    i = bisect.bisect_right([s for s, _ in self._stages], step) - 1
    return language_shares(self._cfg, self._stages[i][1])

  def stats(self) -> dict[str, float | int]:
    """Counters so far, for the metrics log: skips per reason, tokens and share per language, padding."""
    out: dict[str, float | int] = {f"data/skipped_{r}": int(x) for r, x in zip(SKIP_REASONS, self._skipped)}
    real = int(self._tokens.sum())
    per_lang: dict[str, int] = {}
    for lang, n in zip(self._langs, self._tokens):
      per_lang[lang] = per_lang.get(lang, 0) + int(n)
    for lang, n in per_lang.items():
      out[f"data/tokens_{lang}"] = n
      out[f"data/token_share_{lang}"] = n / real if real else 0.0
    out["data/padding_fraction"] = self._padding / (real + self._padding) if real + self._padding else 0.0
    return out

  def close(self) -> None:
    """Stops prefetching and worker processes; the iterator cannot be used afterwards."""
    if self._closed:
      return
    super().close()
    # Let grain's iterators be finalized now, not during interpreter shutdown (where their
    # __del__ fails noisily on half-torn-down modules).
    self._parents = ()
    gc.collect()

  def __str__(self) -> str:
    return f"TrainIterator(step={self._step})"


def _close_at_exit(ref: weakref.ref) -> None:
  it = ref()
  if it is not None:
    it.close()


def _allow_unparsed_absl_flags() -> None:
  # grain's worker processes read absl flags, which fails when the program never parsed them
  # (google/grain#1355); the workaround from that issue: take the flags' defaults as parsed.
  if not absl_flags.FLAGS.is_parsed():
    absl_flags.FLAGS.mark_as_parsed()


def make_train_iterator(cfg: DataConfig, *, seed: int, process_index: int = 0, process_count: int = 1) -> TrainIterator:
  """This process's endless stream of packed, mixed batches; see the module docstring.

  Raises ConfigError at start-up for a path that matches no files, an unknown format, a source
  with no usable document in its first records, or a batch that does not split over processes.
  """
  if not 0 <= process_index < process_count:
    raise ConfigError(f"data: process_index {process_index} is not in [0, {process_count})")
  if cfg.batch_size % process_count:
    raise ConfigError(f"data.batch_size: {cfg.batch_size} does not split over {process_count} processes")
  local_B = cfg.batch_size // process_count
  tokenizer = load_tokenizer(cfg.tokenizer_path)
  resolved = [data_sources.resolve_source(s, i, tokenizer) for i, s in enumerate(cfg.sources)]
  stages = stage_weights(cfg)
  used = {i for _, w in stages for i, x in enumerate(w) if x > 0}
  rows: dict[str, grain.IterDataset] = {}
  for src in resolved:
    if src.index not in used:
      continue
    blocks = data_sources.block_dataset(
        src, tokenizer, seed=_source_seed(seed, src.index), shuffle=cfg.shuffle,
        shuffle_window=cfg.shuffle_window, process_index=process_index, process_count=process_count)
    packed = PackIterDataset(blocks, cfg.seq_len, source=src.index, name=src.name)
    if cfg.worker_count:
      _allow_unparsed_absl_flags()
      packed = packed.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count, per_worker_buffer_size=2))
    rows[src.name] = packed
  names = {src.index: src.name for src in resolved}
  row_stages = [(step * local_B, {names[i]: w for i, w in enumerate(weights) if i in used})
                for step, weights in stages]
  ds = _StagedMixIterDataset(rows, row_stages).batch(local_B, drop_remainder=True)
  if cfg.prefetch:
    ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=cfg.prefetch)
  it = TrainIterator(ds.__iter__(), cfg, stages)
  atexit.register(_close_at_exit, weakref.ref(it))
  return it


def inspect_pipeline(cfg: DataConfig, *, seed: int, num_batches: int) -> dict[str, Any]:
  """Reads `num_batches` batches and summarizes them (the `tools.inspect_data` report)."""
  it = make_train_iterator(cfg, seed=seed)
  configured: dict[str, float] = {}
  t0 = time.perf_counter()  # includes the pipeline's start-up (first windows, workers), not imports
  for _ in range(num_batches):
    for lang, share in it.configured_shares().items():
      configured[lang] = configured.get(lang, 0.0) + share / num_batches
    next(it)
  elapsed = time.perf_counter() - t0
  stats = it.stats()
  it.close()
  langs = sorted({s.lang for s in cfg.sources})
  return {
      "batches": num_batches,
      "token_share": {lang: stats.get(f"data/token_share_{lang}", 0.0) for lang in langs},
      "configured_share": {lang: configured.get(lang, 0.0) for lang in langs},
      "tokens": {lang: stats.get(f"data/tokens_{lang}", 0) for lang in langs},
      "skipped": {r: stats[f"data/skipped_{r}"] for r in SKIP_REASONS},
      "padding_fraction": stats["data/padding_fraction"],
      "tokens_per_sec": num_batches * cfg.batch_size * cfg.seq_len / max(elapsed, 1e-9),
  }
