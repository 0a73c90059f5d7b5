"""Pre-tokenizing a corpus into ArrayRecord shards (the library side of `tools/prepare_data.py`).

The corpus is read with the same readers as training (`data_sources`), so bad records are
skipped and counted the same way. Each input file becomes `shards_per_file` output shards (shard
j keeps the file's records i % shards_per_file == j, which lets several workers share one big
file). A shard holds one record per document: its token ids as little-endian int32, without EOS
(the training reader appends the tokenizer's EOS). Chat sources are refused (ConfigError): their
records would need the loss mask, which depends on the template and `data.loss_on`, and fine-tuning
sets are small enough to tokenize while training.

`manifest.json` in the output directory lists the completed shards with their input, document,
token and skip counts. Shards are written to a `.tmp` file and renamed when complete, and the
manifest is rewritten atomically after each one, so an interrupted run resumes by redoing only
the shards the manifest does not list. A directory with a manifest is a valid training source
(`format` auto or arrayrecord): only the shards it lists are read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
import time
from typing import Any, Callable, Iterator, Optional

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from ar_lm_jax import data_sources
from ar_lm_jax.config import ConfigError, SourceConfig
from ar_lm_jax.data_sources import MANIFEST, RECORD_DTYPE, SKIP_REASONS, ResolvedSource
from ar_lm_jax.tokenizer import load_tokenizer

MANIFEST_VERSION = 1
_WRITER_OPTIONS = "group_size:1"  # one record per chunk: cheap random access for the training reader
_DOCS_PER_BATCH = 256  # documents tokenized together
_PROGRESS_EVERY = 2000  # documents between progress reports from a worker


@dataclasses.dataclass(frozen=True)
class ShardTask:
  name: str  # output file name
  input: str  # input file
  split: int  # keeps records i % num_splits == split
  num_splits: int


def shard_name(path: str, split: int, num_splits: int) -> str:
  """Stable across runs and input additions: the input's name plus a hash of its full path."""
  stem = os.path.basename(path).split(".")[0][:40] or "file"
  digest = hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:10]
  return f"{stem}-{digest}-{split:04d}-of-{num_splits:04d}.array_record"


def _write_json_atomic(path: str, obj: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, sort_keys=True)
  os.replace(tmp, path)


def _tokenize_shard(src: ResolvedSource, task: ShardTask, out_dir: str, tokenizer_path: Optional[str],
                    report: Optional[Callable[[int, int], None]] = None) -> dict[str, Any]:
  """Writes one shard (tmp file, then rename) and returns its manifest entry."""
  tokenizer = load_tokenizer(tokenizer_path)
  skipped = np.zeros(len(SKIP_REASONS), np.int64)
  final = os.path.join(out_dir, task.name)
  tmp = final + ".tmp"
  writer = ArrayRecordWriter(tmp, _WRITER_OPTIONS)
  docs = tokens = 0
  unreported = 0
  batch: list[str] = []

  def flush() -> None:
    nonlocal docs, tokens, unreported
    for ids in tokenizer.encode_batch(batch):
      writer.write(np.asarray(ids, RECORD_DTYPE).tobytes())
      tokens += len(ids)
    docs += len(batch)
    unreported += len(batch)
    batch.clear()
    if report is not None and unreported >= _PROGRESS_EVERY:
      report(unreported, 0)
      unreported = 0

  for item, _, _ in data_sources.read_records(src, task.input, task.split, task.num_splits):
    if isinstance(item, str):
      batch.append(item)
      if len(batch) >= _DOCS_PER_BATCH:
        flush()
    elif item != data_sources.END_OF_FILE:
      skipped[item] += 1
  if batch:
    flush()
  writer.close()
  os.replace(tmp, final)
  if report is not None:
    report(unreported, 1)
  return {"input": task.input, "split": task.split, "num_splits": task.num_splits, "documents": docs,
          "tokens": tokens, "skipped": {r: int(n) for r, n in zip(SKIP_REASONS, skipped)}}


# Worker-process side of the pool: the source, output and a queue for progress reports.
_worker: dict[str, Any] = {}


def _init_worker(src: ResolvedSource, out_dir: str, tokenizer_path: Optional[str], queue: Any) -> None:
  _worker.update(src=src, out_dir=out_dir, tokenizer_path=tokenizer_path, queue=queue)


def _run_task(task: ShardTask) -> tuple[str, dict[str, Any]]:
  w = _worker
  entry = _tokenize_shard(w["src"], task, w["out_dir"], w["tokenizer_path"],
                          report=lambda d, s: w["queue"].put((d, s)))
  return task.name, entry


def _settings(source: SourceConfig, src: ResolvedSource, tokenizer_path: Optional[str]) -> dict[str, Any]:
  tok = load_tokenizer(tokenizer_path)
  return {
      "source": {"path": source.path, "format": src.format, "text_field": src.text_field, "text_unit": src.text_unit},
      "tokenizer": {"eos_id": tok.eos_id, "n_vocab": tok.n_vocab, "ranks_file": os.path.basename(tok.ranks_path)},
  }


def plan(source: SourceConfig, out_dir: str, *, tokenizer_path: Optional[str] = None, num_workers: int = 1,
         shards_per_file: Optional[int] = None) -> tuple[ResolvedSource, dict[str, Any], list[ShardTask]]:
  """Resolves the input, loads or starts the manifest and lists the shards still to write."""
  if source.format == "chat":  # before resolving: nothing of a chat corpus is read or written
    raise ConfigError(f"prepare_data: {source.path!r} is a chat source (format \"chat\"): the shards hold token ids "
                      "only, not the loss mask that scores the assistant turns (nor the chat template it depends on); "
                      "train on the JSONL directly with format \"chat\" (conversations are tokenized as training "
                      "reads them, which is cheap at fine-tuning sizes)")
  src = data_sources.resolve_source(source, 0, label=f"prepare_data input {source.path!r}")
  if src.format == "arrayrecord":
    raise ConfigError(f"prepare_data: {source.path!r} is already ArrayRecord")
  settings = _settings(source, src, tokenizer_path)
  manifest = data_sources.read_manifest(out_dir)
  if manifest is None:
    spf = shards_per_file or max(1, -(-num_workers // len(src.files)))
    manifest = {"version": MANIFEST_VERSION, **settings, "shards_per_file": spf, "shards": {}}
  else:
    for key in ("source", "tokenizer"):
      if manifest.get(key) != settings[key]:
        raise ConfigError(f"prepare_data: {out_dir} holds shards made with {key} {manifest.get(key)}, not "
                          f"{settings[key]}; use a new output directory")
    if shards_per_file and shards_per_file != manifest["shards_per_file"]:
      raise ConfigError(f"prepare_data: {out_dir} was started with --shards_per_file="
                        f"{manifest['shards_per_file']}; resume with the same value")
  spf = manifest["shards_per_file"]
  tasks = [ShardTask(shard_name(f, j, spf), f, j, spf) for f in src.files for j in range(spf)]
  done = {name for name in manifest["shards"] if os.path.isfile(os.path.join(out_dir, name))}
  return src, manifest, [t for t in tasks if t.name not in done]


def prepare_data(source: SourceConfig, out_dir: str, *, tokenizer_path: Optional[str] = None, num_workers: int = 1,
                 shards_per_file: Optional[int] = None, progress: bool = True) -> dict[str, Any]:
  """Tokenizes `source` into ArrayRecord shards in `out_dir`, resuming a previous run; returns the manifest.

  `num_workers` > 1 tokenizes shards in that many processes. Raises ConfigError for a source that
  matches no files, an unknown format, or an output directory made from a different source.
  """
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise ConfigError(f"prepare_data: the output {out_dir} exists and is not a directory")
  # The input and tokenizer are checked before the output directory is made: bad input leaves nothing behind.
  src, manifest, tasks = plan(source, out_dir, tokenizer_path=tokenizer_path, num_workers=num_workers,
                              shards_per_file=shards_per_file)
  try:
    os.makedirs(out_dir, exist_ok=True)
  except OSError as e:
    raise ConfigError(f"prepare_data: cannot create the output {out_dir} ({e.strerror or e})") from None
  manifest_path = os.path.join(out_dir, MANIFEST)
  _write_json_atomic(manifest_path, _with_totals(manifest))
  bar = _Progress(len(manifest["shards"]) + len(tasks), len(manifest["shards"]), enabled=progress)
  try:
    for name, entry in _run(src, out_dir, tokenizer_path, tasks, num_workers, bar):
      manifest["shards"][name] = entry
      _write_json_atomic(manifest_path, _with_totals(manifest))
  finally:
    bar.close()
  return _with_totals(manifest)


def _with_totals(manifest: dict[str, Any]) -> dict[str, Any]:
  shards = manifest["shards"].values()
  skipped = {r: sum(s["skipped"].get(r, 0) for s in shards) for r in SKIP_REASONS}
  return {**manifest, "documents": sum(s["documents"] for s in shards), "tokens": sum(s["tokens"] for s in shards),
          "skipped": skipped}


def _run(src: ResolvedSource, out_dir: str, tokenizer_path: Optional[str], tasks: list[ShardTask],
         num_workers: int, bar: "_Progress") -> Iterator[tuple[str, dict[str, Any]]]:
  if num_workers <= 1 or len(tasks) <= 1:
    for task in tasks:
      entry = _tokenize_shard(src, task, out_dir, tokenizer_path, report=bar.update)
      yield task.name, entry
    return
  # spawn, not fork: tokenizer thread pools and grain threads do not survive a fork.
  ctx = multiprocessing.get_context("spawn")
  queue = ctx.Queue()
  with ctx.Pool(min(num_workers, len(tasks)), initializer=_init_worker,
                initargs=(src, out_dir, tokenizer_path, queue)) as pool:
    results = pool.imap_unordered(_run_task, tasks)
    remaining = len(tasks)
    while remaining:
      try:
        name, entry = results.next(timeout=0.5)
      except multiprocessing.TimeoutError:
        _drain(queue, bar)
        continue
      _drain(queue, bar)
      remaining -= 1
      yield name, entry


def _drain(queue: Any, bar: "_Progress") -> None:
  while not queue.empty():
    docs, shards = queue.get()
    bar.update(docs, shards)


class _Progress:
  """A tqdm bar counting documents, with shards done in its postfix."""

  def __init__(self, total_shards: int, done_shards: int, enabled: bool):
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    self.total, self.done = total_shards, done_shards
    self.bar = tqdm(unit="doc", disable=not enabled, dynamic_ncols=True)
    self.t0 = time.perf_counter()
    self.bar.set_postfix_str(f"shards {self.done}/{self.total}")

  def update(self, docs: int, shards: int) -> None:
    self.done += shards
    self.bar.update(docs)
    self.bar.set_postfix_str(f"shards {self.done}/{self.total}")

  def close(self) -> None:
    self.bar.close()
