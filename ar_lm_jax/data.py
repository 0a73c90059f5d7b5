"""The training input pipeline: sources -> tokenized blocks -> packed rows -> global mixture -> batches.

    virtual shard v of V:  source k ─ read shard v/V ─ shuffle ─ tokenize ─ pack ─┐
                                                                                 ├─ rows of v in the global batch
    the global mixture:    (stage weights, step) -> the source of every global row ┘

The global batch of a step is a function of (train.seed, step, config) alone, whatever the number
of processes and devices. It is drawn from a fixed number V of *virtual shards*
(`data.virtual_shards`, settled from the config at the run's start and saved in its data state).
Each virtual shard reads a disjoint 1/V of every source and has its own reader, shuffle and packer
(concat-then-split, no padding, see `packing`), so what it yields depends on v and V only. Global
rows [v*B/V, (v+1)*B/V) of every step come from virtual shard v. A process with P processes in all
owns the contiguous shards [p*V/P, (p+1)*V/P), i.e. the rows its devices hold on the process-major
mesh (`sharding.device_grid`), and reads nothing else: reading stays disjoint per process. A run
resumed on another process count (any P dividing V) gives each process the shards it now owns.

Why virtual shards and not step-indexed random access over pre-packed rows (Levanter): random access
needs every source pre-tokenized and indexed by token offset before training, while users stream
JSONL, Parquet and text here; packing, mixing and per-language shares would all have to be redone
over a global index. Virtual shards keep the streaming readers, the packer and their small JSON
states as they are, and only fix the unit of sharding to something that does not change.

Which source each global row comes from is decided for the whole batch at once, identically on
every process: row after row, the source whose realized share lags its weight most (a smooth
weighted round-robin), so every step's batch holds each language's share to within one row, and
the token share equals the weight. Staged mixtures (weights that change at given train steps, as in
Llama 3 and OLMo) restart that count at each stage; every source's streams simply continue.

A batch is one train step: [data.batch_size // process_count, seq_len] rows of this process.
`worker_count > 0` moves each stream's reading, tokenizing and packing into that many grain worker
processes (`mp_prefetch`); results are deterministic for a given worker count.

Checkpointing: `TrainIterator.get_state()` is a small JSON dict (each owned virtual shard's packer
states and counters, the mixture's counts, the resolved file list of every source) and `set_state`
takes one process's state or the list of every process's states of the saving run (any process
count): it then continues exactly the batches that would have followed. It is a
`grain.DatasetIterator`, so orbax can save it per process with `grain.checkpoint.CheckpointSave`.

Metrics: `stats()` reports counters summed over all virtual shards of the run and
`data/batch_hash`, a fingerprint of the global batch, the same for any process count. In a
multi-process run it is a collective (one small all-gather): call it on every process, on the same
steps.
"""

from __future__ import annotations

import atexit
import bisect
import gc
import hashlib
import math
import os
import sys
import time
import weakref
from typing import Any, Optional, Sequence

import grain
import numpy as np
from absl import flags as absl_flags

from ar_lm_jax import batch as batch_lib
from ar_lm_jax import chat, data_sources
from ar_lm_jax.config import ConfigError, DataConfig
from ar_lm_jax.data_sources import SKIP_REASONS
from ar_lm_jax.packing import PackIterDataset
from ar_lm_jax.tokenizer import load_tokenizer

STATE_VERSION = 2  # 1: per-process streams (before virtual shards), not resumable here
_REPEAT_WARN_ROWS = 16  # a source whose pass ends before a virtual shard took this many of its rows repeats within its first rows


def _source_seed(seed: int, index: int, shard: int = 0) -> int:
  # grain wants shuffle seeds in [0, 2**32); window shuffle adds the window index to it.
  return int(np.random.SeedSequence([seed % 2**32, index, shard]).generate_state(1)[0] >> 1)


def virtual_shard_count(cfg: DataConfig) -> int:
  """The run's number of virtual shards: data.virtual_shards, or gcd(batch_size, 16) when it is 0."""
  return cfg.virtual_shards or math.gcd(cfg.batch_size, 16)


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


def row_hashes(batch: dict[str, np.ndarray]) -> np.ndarray:
  """uint64 [rows]: a fingerprint of every row (tokens, segment ids, positions)."""
  n = batch["tokens"].shape[0]
  out = np.empty(n, np.uint64)
  for r in range(n):
    h = hashlib.blake2b(digest_size=8)
    for k in batch_lib.KEYS:
      h.update(np.ascontiguousarray(batch[k][r]).tobytes())
    out[r] = np.frombuffer(h.digest(), np.uint64)[0]
  return out


def combine_row_hashes(hashes: np.ndarray) -> str:
  """`data/batch_hash`: the row fingerprints of a global batch, in global row order, as 16 hex digits."""
  return hashlib.blake2b(np.ascontiguousarray(hashes, np.uint64).tobytes(), digest_size=8).hexdigest()


def _files_record(src: data_sources.ResolvedSource) -> dict[str, Any]:
  """What a source's saved positions refer to: its resolved files (relative names and sizes), as a digest."""
  root = os.path.commonpath(src.files) if len(src.files) > 1 else os.path.dirname(src.files[0])
  h = hashlib.blake2b(digest_size=8)
  total = 0
  for f in src.files:
    size = os.path.getsize(f)
    total += size
    h.update(f"{os.path.relpath(f, root)}\t{size}\n".encode())
  return {"files": len(src.files), "bytes": total, "digest": h.hexdigest()}


class _GlobalMix:
  """The source of every global row of a step: a smooth weighted round-robin per stage (state: the stage's counts)."""

  def __init__(self, stages: list[tuple[int, list[float]]], batch_size: int):
    self._starts = [start for start, _ in stages]
    self._weights = [np.asarray(w, np.float64) / sum(w) for _, w in stages]
    self._B = batch_size
    self.stage, self.counts = -1, [0] * len(stages[0][1])

  def rows(self, step: int) -> list[int]:
    stage = bisect.bisect_right(self._starts, step) - 1
    if stage != self.stage:
      self.stage, self.counts = stage, [0] * len(self.counts)
    p = self._weights[stage].tolist()
    counts, n = self.counts, sum(self.counts)
    out = []
    for _ in range(self._B):
      n += 1
      k = max(range(len(p)), key=lambda i: (p[i] * n - counts[i], -i))  # the most behind; ties: the first
      counts[k] += 1
      out.append(k)
    return out

  def get_state(self) -> dict[str, Any]:
    return {"stage": self.stage, "counts": list(self.counts)}

  def set_state(self, state: dict[str, Any]) -> None:
    self.stage, self.counts = int(state["stage"]), [int(c) for c in state["counts"]]


class _ShardedBatchIterator(grain.DatasetIterator):
  """This process's rows of every global batch, each taken from the stream of its virtual shard and source.

  Rows carry `shard` (the virtual shard) and `source`, and the packer's `skipped` and `ends`, for the
  counters of `TrainIterator`.
  """

  def __init__(self, rows: dict[int, dict[int, grain.IterDataset]], names: dict[int, str],
               stages: list[tuple[int, list[float]]], batch_size: int, num_shards: int):
    super().__init__()
    self._rows, self._names = rows, names
    self._mix = _GlobalMix(stages, batch_size)
    self._per_shard = batch_size // num_shards
    self._step = 0
    self._iterators: Optional[dict[int, dict[int, grain.DatasetIterator]]] = None

  def _streams(self) -> dict[int, dict[int, grain.DatasetIterator]]:
    if self._iterators is None:
      self._iterators = {v: {k: ds.__iter__() for k, ds in by_src.items()} for v, by_src in self._rows.items()}
    return self._iterators

  def __next__(self) -> dict[str, np.ndarray]:
    streams = self._streams()
    sources = self._mix.rows(self._step)
    b = self._per_shard
    rows = []
    for v in sorted(streams):
      for r in range(v * b, (v + 1) * b):
        row = next(streams[v][sources[r]])
        row["shard"] = np.int32(v)
        rows.append(row)
    self._step += 1
    return {k: np.stack([row[k] for row in rows]) for k in rows[0]}

  def get_state(self) -> dict[str, Any]:
    return {"step": self._step, "mix": self._mix.get_state(),
            "shards": {str(v): {self._names[k]: it.get_state() for k, it in by_src.items()}
                       for v, by_src in self._streams().items()}}

  def set_state(self, state: dict[str, Any]) -> None:
    for v, by_src in self._streams().items():
      saved = state["shards"][str(v)]
      for k, it in by_src.items():
        if self._names[k] in saved:  # a source added since the checkpoint starts from its beginning
          it.set_state(saved[self._names[k]])
    self._step = int(state["step"])
    self._mix.set_state(state["mix"])

  def start_prefetch(self) -> None:
    for by_src in self._streams().values():
      for it in by_src.values():
        it.start_prefetch()

  def close(self) -> None:
    for by_src in (self._iterators or {}).values():
      for it in by_src.values():
        it.close()
    super().close()


class _ShardedBatchIterDataset(grain.IterDataset):

  def __init__(self, rows: dict[int, dict[int, grain.IterDataset]], names: dict[int, str],
               stages: list[tuple[int, list[float]]], batch_size: int, num_shards: int):
    super().__init__([ds for by_src in rows.values() for ds in by_src.values()])
    self._args = (rows, names, stages, batch_size, num_shards)

  def __iter__(self) -> _ShardedBatchIterator:
    return _ShardedBatchIterator(*self._args)


def _allgather(x: np.ndarray) -> np.ndarray:
  """[processes, n]: `x` (int32 [n]) of every process; the one collective of the data pipeline."""
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return np.asarray(multihost_utils.process_allgather(x))


class TrainIterator(grain.DatasetIterator):
  """Batches (`batch.KEYS`, int32 [B, T]) for one process, with metrics.

  `get_state()`/`set_state()` resume exactly, on any process count that divides the virtual
  shards; `stats()` reports the run's counters (they are part of the state, kept per virtual
  shard, so they continue across restarts and process-count changes).
  """

  def __init__(self, parent: grain.DatasetIterator, cfg: DataConfig, stages: list[tuple[int, list[float]]], *,
               resolved: Sequence[data_sources.ResolvedSource], num_shards: int, shards: Sequence[int],
               process_index: int, process_count: int):
    super().__init__(parent)
    self._cfg, self._stages = cfg, stages
    self._langs = [s.lang for s in cfg.sources]
    self._names = [src.name for src in resolved]
    self._described = [data_sources._describe(s, i) for i, s in enumerate(cfg.sources)]  # pylint: disable=protected-access
    self._files = {src.name: _files_record(src) for src in resolved}
    self._ends_per_pass = np.array([data_sources.ends_per_pass(src, num_shards) for src in resolved], np.int64)
    self._V, self._shards = num_shards, list(shards)
    self._local = {v: i for i, v in enumerate(self._shards)}
    self._process_index, self._process_count = process_index, process_count
    self._step = 0
    K, S = len(cfg.sources), len(self._shards)
    self._tokens = np.zeros((S, K), np.int64)  # non-padding tokens per owned virtual shard and source
    self._rows = np.zeros((S, K), np.int64)  # rows taken
    self._ends = np.zeros((S, K), np.int64)  # pass ends read (see data_sources)
    self._padding = np.zeros(S, np.int64)
    self._skipped = np.zeros((S, len(SKIP_REASONS)), np.int64)
    self._warned: set[int] = set()
    self._last_batch: Optional[dict[str, np.ndarray]] = None  # for data/batch_hash

  @property
  def step(self) -> int:
    """The number of batches yielded so far (the train step the next batch belongs to)."""
    return self._step

  @property
  def virtual_shards(self) -> int:
    return self._V

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._parent)
    local = np.array([self._local[int(v)] for v in batch["shard"]])
    src = batch["source"]
    real = (batch["segment_ids"] > 0).sum(axis=1)
    np.add.at(self._tokens, (local, src), real)
    np.add.at(self._padding, local, batch["segment_ids"].shape[1] - real)
    np.add.at(self._skipped, local, batch["skipped"])
    before = self._rows.copy()
    np.add.at(self._rows, (local, src), 1)
    np.add.at(self._ends, (local, src), batch["ends"])
    self._warn_repeats(before, local, src, batch["ends"])
    self._step += 1
    out = {k: batch[k] for k in batch_lib.KEYS}
    self._last_batch = out
    return out

  def _warn_repeats(self, rows_before: np.ndarray, local: np.ndarray, src: np.ndarray, ends: np.ndarray) -> None:
    if self._process_index != 0:
      return
    for s, k, e in zip(local, src, ends):
      k = int(k)
      if e and k not in self._warned and rows_before[s, k] < _REPEAT_WARN_ROWS:
        self._warned.add(k)
        print(f"warning: {self._described[k]} repeats within its first rows: virtual shard {self._shards[s]} of "
              f"{self._V} read all of its part of the source before taking {_REPEAT_WARN_ROWS} rows of "
              f"{self._cfg.seq_len} tokens from it (its documents will recur in every batch); see data/epochs_"
              f"{self._metric_name(k)} and tools.inspect_data", file=sys.stderr, flush=True)

  def _metric_name(self, k: int) -> str:
    return f"{k}_{self._langs[k]}"

  # --- state -------------------------------------------------------------------------------------

  def get_state(self) -> dict[str, Any]:
    inner = self._parent.get_state()
    shards = {}
    for i, v in enumerate(self._shards):
      shards[str(v)] = {
          "streams": inner["shards"][str(v)],
          "tokens": self._by_name(self._tokens[i]), "rows": self._by_name(self._rows[i]),
          "ends": self._by_name(self._ends[i]), "padding": int(self._padding[i]),
          "skipped": {r: int(x) for r, x in zip(SKIP_REASONS, self._skipped[i])},
      }
    return {"version": STATE_VERSION, "virtual_shards": self._V, "step": self._step, "mix": inner["mix"],
            "files": self._files, "shards": shards}

  def _by_name(self, x: np.ndarray) -> dict[str, int]:
    return {name: int(v) for name, v in zip(self._names, x)}

  def set_state(self, state: dict[str, Any] | Sequence[dict[str, Any]]) -> None:
    """Restores from this process's state, or from the states of every process of the saving run."""
    states = [state] if isinstance(state, dict) else list(state)
    for st in states:
      if st.get("version") != STATE_VERSION:
        raise ConfigError("data: the checkpoint's data-iterator state was written by an older data pipeline "
                          "(per-process streams, before virtual shards); it cannot continue that data order: "
                          "start a new run (another workdir), e.g. with checkpoint.init_from=<this workdir>")
    first = states[0]
    if int(first["virtual_shards"]) != self._V:
      raise ConfigError(f"data.virtual_shards: the checkpoint's data order is drawn from {first['virtual_shards']} "
                        f"virtual shards, this run's config gives {self._V}; set data.virtual_shards="
                        f"{first['virtual_shards']} to continue it")
    for i, name in enumerate(self._names):
      then, now = first["files"].get(name), self._files[name]
      if then is not None and then != now:
        raise ConfigError(f"{self._described[i]}: its files are not those the checkpoint's data positions refer to "
                          f"(then {then['files']} files, {then['bytes']} bytes; now {now['files']} files, "
                          f"{now['bytes']} bytes): restore the original files, or start a new run")
    shards: dict[str, Any] = {}
    for st in states:
      if st["step"] != first["step"] or st["mix"] != first["mix"]:
        raise ConfigError("data: the per-process data states of the checkpoint disagree on the step")
      shards.update(st["shards"])
    missing = [v for v in self._shards if str(v) not in shards]
    if missing:
      raise ConfigError(f"data: the checkpoint's data state has no virtual shard {missing[0]} (of {self._V})")
    self._parent.set_state({"step": first["step"], "mix": first["mix"],
                            "shards": {str(v): shards[str(v)]["streams"] for v in self._shards}})
    self._step = int(first["step"])
    for i, v in enumerate(self._shards):
      sh = shards[str(v)]
      self._tokens[i] = [sh["tokens"].get(n, 0) for n in self._names]
      self._rows[i] = [sh["rows"].get(n, 0) for n in self._names]
      self._ends[i] = [sh["ends"].get(n, 0) for n in self._names]
      self._padding[i] = sh["padding"]
      self._skipped[i] = [sh["skipped"].get(r, 0) for r in SKIP_REASONS]
    self._warned = set(range(len(self._names)))  # a resumed run warned (or not) when it started
    self._last_batch = None

  # --- metrics -----------------------------------------------------------------------------------

  def configured_shares(self, step: Optional[int] = None) -> dict[str, float]:
    """Per-language weights in force at `step` (default: the next batch's step), normalized."""
    step = self._step if step is None else step
    i = bisect.bisect_right([s for s, _ in self._stages], step) - 1
    return language_shares(self._cfg, self._stages[i][1])

  def _counters(self) -> np.ndarray:
    return np.concatenate([self._tokens.sum(0), self._ends.sum(0), [self._padding.sum()], self._skipped.sum(0)])

  def stats(self) -> dict[str, float | int | str]:
    """The run's counters so far, summed over every virtual shard (a collective in a multi-process run),
    and the global batch's fingerprint `data/batch_hash`."""
    counters = self._counters().astype(np.int64)
    batch = self._last_batch
    hashes = row_hashes(batch) if batch is not None else np.zeros(0, np.uint64)
    if self._process_count > 1:
      mine = np.concatenate([hashes.view(np.int32), counters.view(np.int32)])
      every = _allgather(mine)
      n = hashes.size * 2
      hashes = np.ascontiguousarray(every[:, :n]).view(np.uint64).ravel()
      counters = np.ascontiguousarray(every[:, n:]).view(np.int64).sum(axis=0)
    K = len(self._names)
    tokens, ends, padding, skipped = counters[:K], counters[K:2 * K], int(counters[2 * K]), counters[2 * K + 1:]
    out: dict[str, float | int | str] = {f"data/skipped_{r}": int(x) for r, x in zip(SKIP_REASONS, skipped)}
    real = int(tokens.sum())
    per_lang: dict[str, int] = {}
    for lang, n_tok in zip(self._langs, tokens):
      per_lang[lang] = per_lang.get(lang, 0) + int(n_tok)
    for lang, n_tok in per_lang.items():
      out[f"data/tokens_{lang}"] = n_tok
      out[f"data/token_share_{lang}"] = n_tok / real if real else 0.0
    out["data/padding_fraction"] = padding / (real + padding) if real + padding else 0.0
    for k in range(K):  # passes over the source's files, summed over virtual shards / V
      out[f"data/epochs_{self._metric_name(k)}"] = float(ends[k]) / float(self._ends_per_pass[k] * self._V)
    if hashes.size:
      out["data/batch_hash"] = combine_row_hashes(hashes)
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
    return f"TrainIterator(step={self._step}, virtual_shards={self._shards}/{self._V})"


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
  with no usable document in its first records, or virtual shards that do not split over processes.
  """
  if not 0 <= process_index < process_count:
    raise ConfigError(f"data: process_index {process_index} is not in [0, {process_count})")
  V = virtual_shard_count(cfg)
  if V % process_count:
    raise ConfigError(f"data.virtual_shards: the data order's {V} virtual shards do not split over {process_count} "
                      f"processes; use a process count that divides {V}, or (for a new run) set data.virtual_shards "
                      f"to a multiple of {process_count} that divides data.batch_size={cfg.batch_size}")
  per_process = V // process_count
  shards = range(process_index * per_process, (process_index + 1) * per_process)
  tokenizer = load_tokenizer(cfg.tokenizer_path)
  resolved = [data_sources.resolve_source(s, i, tokenizer, min_documents=V) for i, s in enumerate(cfg.sources)]
  if any(src.format == "chat" for src in resolved):
    try:
      chat.check_template(cfg.chat_template, tokenizer)
    except chat.ChatError as e:
      raise ConfigError(f"data.chat_template: {e}") from None
  stages = stage_weights(cfg)
  used = sorted({i for _, w in stages for i, x in enumerate(w) if x > 0})
  # The window is split over the virtual shards: the documents held and read ahead at start-up stay
  # those of one window per source, whatever V is.
  window = -(-cfg.shuffle_window // V)
  rows: dict[int, dict[int, grain.IterDataset]] = {}
  for v in shards:
    rows[v] = {}
    for k in used:
      src = resolved[k]
      blocks = data_sources.block_dataset(
          src, tokenizer, seed=_source_seed(seed, src.index, v), shuffle=cfg.shuffle,
          shuffle_window=window, shard=v, num_shards=V, chat_template=cfg.chat_template, loss_on=cfg.loss_on)
      packed = PackIterDataset(blocks, cfg.seq_len, source=src.index, name=src.name)
      if cfg.worker_count:
        _allow_unparsed_absl_flags()
        packed = packed.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count,
                                                                 per_worker_buffer_size=2))
      rows[v][k] = packed
  names = {src.index: src.name for src in resolved}
  ds = _ShardedBatchIterDataset(rows, names, stages, cfg.batch_size, V)
  if cfg.prefetch:
    ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=cfg.prefetch)
  it = TrainIterator(ds.__iter__(), cfg, stages, resolved=resolved, num_shards=V, shards=shards,
                     process_index=process_index, process_count=process_count)
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
      "virtual_shards": it.virtual_shards,
      "token_share": {lang: stats.get(f"data/token_share_{lang}", 0.0) for lang in langs},
      "configured_share": {lang: configured.get(lang, 0.0) for lang in langs},
      "tokens": {lang: stats.get(f"data/tokens_{lang}", 0) for lang in langs},
      "epochs": {f"{i}_{s.lang}": stats[f"data/epochs_{i}_{s.lang}"] for i, s in enumerate(cfg.sources)},
      "skipped": {r: stats[f"data/skipped_{r}"] for r in SKIP_REASONS},
      "padding_fraction": stats["data/padding_fraction"],
      "tokens_per_sec": num_batches * cfg.batch_size * cfg.seq_len / max(elapsed, 1e-9),
  }
