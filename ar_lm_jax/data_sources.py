"""Reading documents from the formats real corpora come in, as resumable grain datasets.

A source (`SourceConfig`) is a file, a glob or a directory of one format:

- JSONL (`.jsonl`, `.json`, `.ndjson`), plain or compressed (`.gz`, `.zst`), one record per line;
  the document is the string in `text_field`.
- Parquet: the document is the string column `text_field`.
- Plain text (`.txt`, also `.gz`/`.zst`): a document per line, or per blank-line-separated
  paragraph (`text_unit`).
- Chat (`format: "chat"`): JSONL conversations `{"messages": [...]}` or `{"prompt", "response"}`,
  rendered by `chat.render` into tokens and a loss mask (blocks then carry `loss_mask`; no EOS is
  added, the template ends each turn).
- ArrayRecord shards of pre-tokenized documents (little-endian int32 ids, no EOS), written by
  `python -m tools.prepare_data`; a directory holding its `manifest.json` reads the complete shards.

Everything a pipeline reads becomes a stream of *blocks*: a few dozen documents tokenized and
concatenated, each followed by EOS, `{"tokens": int32[n], "lengths": int32[docs],
"skipped": int64[len(SKIP_REASONS)], "ends": int64[]}`. Bad records never stop a run: they are
dropped and counted per reason in `skipped`, which travels with the data so that the counts
survive grain worker processes and checkpoints. They are counted in the first pass over a file
only, so a record is counted once however many epochs re-read it. `ends` counts the passes over
files (streamed) or over the shard's records (ArrayRecord) that ended in the block; dividing by
`ends_per_pass` gives epochs.

Sharding: a stream reads one of `num_shards` disjoint shards of a source (the pipeline's virtual
shards, see `data`). ArrayRecord records are dealt out by index (`records[v::V]`). Streamed files
are dealt out whole when their count is a multiple of the shard count, and otherwise every shard
reads every file and keeps records `i % V == v` (decompressing is cheap next to tokenizing, and
this keeps shards balanced).

Order: ArrayRecord is shuffled over the shard's records, anew each epoch (grain's per-epoch index shuffle).
Streamed sources reshuffle their file order each epoch, read a few files at a time interleaved,
and shuffle documents within windows of `DataConfig.shuffle_window`.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import io
import itertools
import json
import os
import zlib
from typing import Any, Iterator, Optional, Sequence

import grain
import numpy as np
import zstandard

from ar_lm_jax import chat
from ar_lm_jax.config import ConfigError, SourceConfig
from ar_lm_jax.tokenizer import Arcade100k

SKIP_REASONS = ("malformed_json", "missing_field", "empty", "invalid_utf8", "truncated_file", "bad_record") + chat.SKIP_REASONS
_REASON = {r: i for i, r in enumerate(SKIP_REASONS)}
END_OF_FILE = -1  # marker a file reader yields once per pass, so a stream of empty files never stalls

MANIFEST = "manifest.json"
RECORD_DTYPE = np.dtype("<i4")  # pre-tokenized ids on disk
DOCS_PER_BLOCK = 64  # documents tokenized together, and the granularity of a packer's checkpoint
_FILES_OPEN_PER_SOURCE = 4  # streamed files a source reads interleaved at a time
_RECORDS_BUFFERED_PER_FILE = 256  # records read ahead per open file
_PROBE_RECORDS = 1000  # records read at start-up to check that a streamed source has usable documents
_EXTENSIONS = {
    ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl",
    ".parquet": "parquet", ".pq": "parquet",
    ".txt": "text", ".text": "text",
    ".array_record": "arrayrecord", ".arrayrecord": "arrayrecord",
}
_COMPRESSED = (".gz", ".zst", ".zstd")
_GZIP_MAGIC, _ZSTD_MAGIC = b"\x1f\x8b", b"\x28\xb5\x2f\xfd"


def _describe(src: SourceConfig, index: int) -> str:
  return f"data.sources[{index}] (lang={src.lang}, path={src.path!r})"


@dataclasses.dataclass(frozen=True)
class ResolvedSource:
  """A source's files, format and reading options, checked at start-up."""
  index: int  # position in DataConfig.sources
  lang: str
  format: str  # jsonl, parquet, text or arrayrecord
  files: tuple[str, ...]
  text_field: str
  text_unit: str

  @property
  def name(self) -> str:
    return f"{self.index}:{self.lang}"


# ---------------------------------------------------------------------------
# Resolving paths and formats (start-up; errors are ConfigError).


def format_of(path: str) -> Optional[str]:
  """The format a file's extension names (compression suffix ignored), or None."""
  name = path.lower()
  for suffix in _COMPRESSED:
    if name.endswith(suffix):
      name = name[: -len(suffix)]
      fmt = _EXTENSIONS.get(os.path.splitext(name)[1])
      return fmt if fmt in ("jsonl", "text") else None  # compressed Parquet/ArrayRecord is not a thing
  return _EXTENSIONS.get(os.path.splitext(name)[1])


def read_manifest(directory: str) -> Optional[dict]:
  path = os.path.join(directory, MANIFEST)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def _list_path(path: str) -> list[str]:
  if os.path.isdir(path):
    manifest = read_manifest(path)
    if manifest is not None:  # a prepare_data output: only the shards it completed
      return [os.path.join(path, name) for name in sorted(manifest.get("shards", {}))]
    files = []
    for root, dirs, names in os.walk(path):
      dirs[:] = sorted(d for d in dirs if not d.startswith("."))
      files += [os.path.join(root, n) for n in names
                if not n.startswith(".") and not n.endswith(".tmp") and n != MANIFEST]
    return sorted(files)
  if glob.has_magic(path):
    return sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
  return [path] if os.path.isfile(path) else []


def resolve_source(src: SourceConfig, index: int, tokenizer: Optional[Arcade100k] = None,
                   label: Optional[str] = None, min_documents: int = 1) -> ResolvedSource:
  """Lists a source's files and settles its format; raises ConfigError naming the source (or `label`)."""
  where = label or _describe(src, index)
  path = os.path.expanduser(src.path)
  files = _list_path(path)
  if not files:
    raise ConfigError(f"{where}: path matches no files")
  found = {f: format_of(f) for f in files}
  if os.path.isdir(path):  # a directory may hold READMEs and the like: keep the data files
    known = [f for f in files if found[f] is not None]
    wanted = "jsonl" if src.format == "chat" else src.format
    files = [f for f in known if found[f] == wanted] or (known if src.format == "auto" else files)
  fmt = src.format
  if fmt == "auto":
    unknown = [f for f in files if found[f] is None]
    if unknown or not files:
      shown = repr(unknown[0]) if unknown else "its files"
      raise ConfigError(f"{where}: unknown format of {shown} (known extensions: "
                        f"{', '.join(sorted(_EXTENSIONS))}, with .gz/.zst for jsonl and text); set `format`")
    kinds = sorted({found[f] for f in files})
    if len(kinds) > 1:
      raise ConfigError(f"{where}: files of several formats {kinds}; set `format` or use one source per format")
    fmt = kinds[0]
  resolved = ResolvedSource(index, src.lang, fmt, tuple(files), src.text_field, src.text_unit)
  if fmt == "arrayrecord":
    _check_arrayrecord(resolved, where, tokenizer)
  else:
    _probe(resolved, where, min_documents)
  return resolved


def _check_arrayrecord(src: ResolvedSource, where: str, tokenizer: Optional[Arcade100k]) -> None:
  for directory in sorted({os.path.dirname(f) for f in src.files}):
    manifest = read_manifest(directory)
    if manifest is None or tokenizer is None:
      continue
    made_with = manifest.get("tokenizer", {})
    if made_with.get("eos_id") != tokenizer.eos_id or made_with.get("n_vocab") != tokenizer.n_vocab:
      raise ConfigError(f"{where}: shards in {directory} were tokenized with {made_with}, but data.tokenizer_path "
                        f"gives eos_id={tokenizer.eos_id}, n_vocab={tokenizer.n_vocab}")
  try:
    n = len(grain.sources.ArrayRecordDataSource(list(src.files)))
  except Exception as e:  # array_record raises bare RuntimeErrors for files that are not ArrayRecord
    raise ConfigError(f"{where}: cannot open as ArrayRecord: {e}") from None
  if n == 0:
    raise ConfigError(f"{where}: the ArrayRecord shards hold no records")


def _probe(src: ResolvedSource, where: str, min_documents: int = 1) -> None:
  """Fails fast when the first records hold no usable document (a wrong text_field, say), or when the
  whole source holds fewer than `min_documents` (one per virtual shard, each of which reads its own)."""
  skipped = np.zeros(len(SKIP_REASONS), np.int64)
  seen = usable = 0
  for path in src.files[:10]:
    if src.format == "parquet":
      _check_parquet_column(path, src.text_field, where)
    for item, _, _ in read_records(src, path, 0, 1):
      if not isinstance(item, int):
        usable += 1
        if usable >= min_documents:
          return
      elif item != END_OF_FILE:
        skipped[item] += 1
      seen += 1
      if seen >= _PROBE_RECORDS:
        break
    if seen >= _PROBE_RECORDS:
      break
  if usable:
    if seen >= _PROBE_RECORDS or len(src.files) > 10:
      return  # not read to the end: it may hold more
    raise ConfigError(f"{where}: holds {usable} usable document(s), fewer than the {min_documents} virtual shards "
                      f"(data.virtual_shards) that each read their own; add documents or use fewer virtual shards")
  counts = {r: int(n) for r, n in zip(SKIP_REASONS, skipped) if n}
  raise ConfigError(f"{where}: no usable document in its first {seen} records (skipped: {counts or 'none'}); "
                    f"check format={src.format!r} and text_field={src.text_field!r}")


def _check_parquet_column(path: str, field: str, where: str) -> None:
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  try:
    names = pq.ParquetFile(path).schema_arrow.names
  except Exception as e:  # pyarrow raises ArrowInvalid and friends for non-Parquet files
    raise ConfigError(f"{where}: cannot read {path!r} as Parquet: {e}") from None
  if field not in names:
    raise ConfigError(f"{where}: {path!r} has no column {field!r} (columns: {names}); set text_field")


# ---------------------------------------------------------------------------
# Reading records from one file, resumably. A record is a document (str) or a skip reason (int).


def _open_binary(path: str) -> tuple[io.BufferedIOBase, bool]:
  """Opens a file for binary reading, decompressing gzip or zstd (sniffed from the magic bytes).

  Returns the stream and whether it is compressed (compressed streams cannot seek).
  """
  raw = open(path, "rb")
  head = raw.peek(4)[:4]
  if head.startswith(_GZIP_MAGIC):
    return gzip.GzipFile(fileobj=raw, mode="rb"), True
  if head.startswith(_ZSTD_MAGIC):
    reader = zstandard.ZstdDecompressor().stream_reader(raw, closefd=True)
    return io.BufferedReader(reader, buffer_size=1 << 20), True
  return raw, False


def _skip_bytes(f: io.BufferedIOBase, n: int) -> None:
  """Decompresses and discards `n` bytes."""
  while n > 0:
    chunk = f.read(min(n, 1 << 22))
    if not chunk:
      raise EOFError("file ended before the checkpointed offset")
    n -= len(chunk)


class _Bad(int):
  """A skip reason's index, returned in place of a parsed record."""


def _load_json(line: bytes) -> Any:
  """The line's JSON value, or the reason (a _Bad) it is skipped."""
  try:
    return json.loads(line)
  except UnicodeDecodeError:
    return _Bad(_REASON["invalid_utf8"])
  except ValueError:
    return _Bad(_REASON["malformed_json"])


def _parse_json(line: bytes, field: str) -> str | int:
  record = _load_json(line)
  if isinstance(record, _Bad):
    return int(record)
  text = record.get(field) if isinstance(record, dict) else None
  if not isinstance(text, str):
    return _REASON["missing_field"]
  return _check_text(text)


def _check_text(text: str) -> str | int:
  if not text or text.isspace():
    return _REASON["empty"]
  if not text.isascii():
    try:
      text.encode("utf-8")  # JSON escapes can smuggle in lone surrogates
    except UnicodeEncodeError:
      return _REASON["invalid_utf8"]
  return text


def _parse_chat(line: bytes) -> list[dict[str, str]] | int:
  """A conversation's validated messages, or the reason it is skipped."""
  record = _load_json(line)
  if isinstance(record, _Bad):
    return int(record)
  try:
    return chat.messages_of(record)
  except chat.ChatError as e:
    return _REASON[e.reason]


def _parse_text(raw: bytes) -> str | int:
  try:
    return _check_text(raw.decode("utf-8"))
  except UnicodeDecodeError:
    return _REASON["invalid_utf8"]


def _raw_records(f: io.BufferedIOBase, unit: str) -> Iterator[tuple[bytes, int]]:
  """Non-blank lines (or paragraphs) with the length in bytes each consumed, separators included."""
  if unit == "line":
    for line in f:
      if line.strip():
        yield line, len(line)
      else:
        yield b"", len(line)
    return
  lines, size = [], 0
  for line in f:
    size += len(line)
    if line.strip():
      lines.append(line)
    elif lines:
      yield b"".join(lines), size
      lines, size = [], 0
    else:
      yield b"", size
      size = 0
  if lines:
    yield b"".join(lines), size


def read_records(src: ResolvedSource, path: str, shard: int, num_shards: int,
                 record: int = 0, offset: int = 0) -> Iterator[tuple[str | int, int, int]]:
  """Yields `(document or skip reason, next record index, next byte offset)` for records `i % num_shards == shard`.

  Reading starts at `record` (counted over all records of the file, blank lines not counted) and,
  for line formats, at decompressed byte `offset`, both as returned by an earlier call. A file
  that is cut short yields `truncated_file` once and ends.
  """
  if src.format == "parquet":
    yield from _parquet_records(src, path, shard, num_shards, record)
    return
  parse = (lambda b: _parse_json(b, src.text_field)) if src.format == "jsonl" else _parse_text
  if src.format == "chat":
    parse = _parse_chat
  unit = src.text_unit if src.format == "text" else "line"
  try:
    f, compressed = _open_binary(path)
    with f:
      if offset and compressed:
        _skip_bytes(f, offset)
      elif offset:
        f.seek(offset)
      for raw, size in _raw_records(f, unit):
        offset += size
        if not raw:
          continue
        mine = record % num_shards == shard
        record += 1
        if mine:
          yield parse(raw), record, offset
  except (EOFError, OSError, zlib.error, zstandard.ZstdError):
    yield _REASON["truncated_file"], record, offset


def _parquet_records(src: ResolvedSource, path: str, shard: int, num_shards: int,
                     start: int) -> Iterator[tuple[str | int, int, int]]:
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  record = start
  try:
    pf = pq.ParquetFile(path)
    if src.text_field not in pf.schema_arrow.names:
      for record in range(start, pf.metadata.num_rows):
        if record % num_shards == shard:
          yield _REASON["missing_field"], record + 1, 0
      return
    record = 0
    for group in range(pf.num_row_groups):
      rows = pf.metadata.row_group(group).num_rows
      if record + rows <= start:
        record += rows
        continue
      for batch in pf.iter_batches(batch_size=1024, row_groups=[group], columns=[src.text_field]):
        values = batch.column(0)
        if not pa.types.is_large_binary(values.type):
          values = values.cast(pa.large_binary())  # decode ourselves, so bad UTF-8 is one skipped row
        for value in values.to_pylist():
          record += 1
          if record <= start or (record - 1) % num_shards != shard:
            continue
          yield (_REASON["missing_field"] if value is None else _parse_text(value)), record, 0
  except (OSError, pa.ArrowException):
    yield _REASON["truncated_file"], max(record, start), 0


def iter_documents(src: ResolvedSource, shard: int = 0, num_shards: int = 1,
                   skipped: Optional[np.ndarray] = None) -> Iterator[str | list]:
  """Every document (conversation, for chat) of a streamed source in file order, once; skip reasons are added to `skipped`."""
  for path in src.files:
    for item, _, _ in read_records(src, path, shard, num_shards):
      if not isinstance(item, int):
        yield item
      elif skipped is not None:
        skipped[item] += 1


# ---------------------------------------------------------------------------
# grain datasets.


@dataclasses.dataclass(frozen=True)
class _FileShard:
  path: str
  shard: int  # keep records i % num_shards == shard
  num_shards: int


class _FileRecordsIterator(grain.DatasetIterator):
  """Records of one file shard, then END_OF_FILE; the state is (record index, byte offset).

  Skip reasons are yielded in the first pass over the file only (`count_skips`), so that a bad
  record is counted once, not once per epoch.
  """

  def __init__(self, src: ResolvedSource, file_shard: _FileShard, count_skips: bool = True):
    super().__init__()
    self._src, self._fs, self._count_skips = src, file_shard, count_skips
    self._record = self._offset = 0
    self._phase = 0  # 0 reading, 1 file done (END_OF_FILE next), 2 finished
    self._reader: Optional[Iterator] = None

  def __next__(self) -> str | int:
    if self._phase == 0:
      if self._reader is None:
        fs = self._fs
        self._reader = read_records(self._src, fs.path, fs.shard, fs.num_shards, self._record, self._offset)
      for item, self._record, self._offset in self._reader:
        if self._count_skips or not isinstance(item, int):
          return item
      self._phase = 1
    if self._phase == 1:
      self._phase = 2
      return END_OF_FILE
    raise StopIteration

  def get_state(self) -> dict[str, Any]:
    return {"record": self._record, "offset": self._offset, "phase": self._phase}

  def set_state(self, state: dict[str, Any]) -> None:
    self.close_reader()
    self._record, self._offset, self._phase = state["record"], state["offset"], state["phase"]

  def close_reader(self) -> None:
    if self._reader is not None:
      self._reader.close()
      self._reader = None

  def close(self) -> None:
    self.close_reader()
    super().close()


class _FileRecordsIterDataset(grain.IterDataset):

  def __init__(self, src: ResolvedSource, file_shard: _FileShard, count_skips: bool = True):
    super().__init__()
    self._src, self._fs, self._count_skips = src, file_shard, count_skips

  def __iter__(self) -> _FileRecordsIterator:
    return _FileRecordsIterator(self._src, self._fs, self._count_skips)


class _ChainIterator(grain.DatasetIterator):
  """The elements of iterable datasets[0], then datasets[1], ...; the state is (index, the current one's state)."""

  def __init__(self, datasets: grain.MapDataset):
    super().__init__()
    self._datasets, self._index = datasets, 0
    self._it: Optional[grain.DatasetIterator] = None

  def __next__(self) -> Any:
    while True:
      if self._it is None:
        self._it = self._datasets[self._index].__iter__()
      try:
        return next(self._it)
      except StopIteration:
        self._it.close()
        self._it, self._index = None, self._index + 1

  def get_state(self) -> dict[str, Any]:
    return {"index": self._index, "inner": None if self._it is None else self._it.get_state()}

  def set_state(self, state: dict[str, Any]) -> None:
    if self._it is not None:
      self._it.close()
    self._index, self._it = int(state["index"]), None
    if state["inner"] is not None:
      self._it = self._datasets[self._index].__iter__()
      self._it.set_state(state["inner"])

  def close(self) -> None:
    if self._it is not None:
      self._it.close()
    super().close()


class _ChainIterDataset(grain.IterDataset):

  def __init__(self, datasets: grain.MapDataset):
    super().__init__()
    self._datasets = datasets

  def __iter__(self) -> _ChainIterator:
    return _ChainIterator(self._datasets)


class _OpenFile:
  """grain map_with_index fn: the i-th file shard of the endless file sequence -> its records (skips counted in pass 0)."""

  def __init__(self, src: ResolvedSource, files_per_pass: int):
    self._src, self._files_per_pass = src, files_per_pass

  def __call__(self, index: int, file_shard: _FileShard) -> _FileRecordsIterDataset:
    return _FileRecordsIterDataset(self._src, file_shard, count_skips=index < self._files_per_pass)


class TokenizeBlock:
  """grain batch_fn: records (documents and skip reasons) -> one block of tokenized documents."""

  def __init__(self, tokenizer: Arcade100k):
    self.tokenizer = tokenizer

  def __call__(self, records: Sequence[str | int]) -> dict[str, np.ndarray]:
    texts = [r for r in records if isinstance(r, str)]
    reasons = np.array([r for r in records if isinstance(r, int) and r != END_OF_FILE], np.int64)
    skipped = np.bincount(reasons, minlength=len(SKIP_REASONS)).astype(np.int64)
    ends = sum(1 for r in records if isinstance(r, int) and r == END_OF_FILE)
    ids = self.tokenizer.encode_batch(texts) if texts else []
    lengths = np.array([len(x) for x in ids], np.int32)
    flat = np.fromiter(itertools.chain.from_iterable(ids), np.int32, count=int(lengths.sum()))
    return _with_eos(flat, lengths, self.tokenizer.eos_id, skipped, ends)


class ChatTokenizeBlock:
  """grain batch_fn: records (conversations and skip reasons) -> one block with a `loss_mask` (see `chat`)."""

  def __init__(self, tokenizer: Arcade100k, template: str = "", loss_on: str = "assistant"):
    self.tokenizer, self.template, self.loss_on = tokenizer, template, loss_on

  def __call__(self, records: Sequence[list | int]) -> dict[str, np.ndarray]:
    skipped = np.zeros(len(SKIP_REASONS), np.int64)
    ids, masks = [], []
    for r in records:
      if isinstance(r, int):
        if r != END_OF_FILE:
          skipped[r] += 1
        continue
      try:
        tokens, mask = chat.render(r, self.template, loss_on=self.loss_on, tokenizer=self.tokenizer)
      except chat.ChatError as e:
        skipped[_REASON[e.reason]] += 1
        continue
      ids.append(tokens)
      masks.append(mask)
    ends = sum(1 for r in records if isinstance(r, int) and r == END_OF_FILE)
    lengths = np.array([len(x) for x in ids], np.int32)
    cat = lambda xs, dtype: np.concatenate(xs).astype(dtype) if xs else np.zeros(0, dtype)
    return {"tokens": cat(ids, np.int32), "lengths": lengths, "loss_mask": cat(masks, np.uint8),
            "skipped": skipped, "ends": np.int64(ends)}


class DecodeBlock:
  """grain batch_fn: ArrayRecord records (pre-tokenized documents) -> one block.

  With `records_per_pass`, records come as (index in the endless stream, bytes): bad records are
  counted in the first pass only, and the last record of each pass counts as a pass end.
  """

  def __init__(self, eos_id: int, n_vocab: int, records_per_pass: Optional[int] = None):
    self.eos_id, self.n_vocab, self.records_per_pass = eos_id, n_vocab, records_per_pass

  def __call__(self, records: Sequence[bytes | tuple[int, bytes]]) -> dict[str, np.ndarray]:
    skipped = np.zeros(len(SKIP_REASONS), np.int64)
    docs, ends, n = [], 0, self.records_per_pass
    for r in records:
      index, r = r if n else (0, r)
      count = index < (n or 1)
      ends += bool(n) and index % n == n - 1
      if len(r) % RECORD_DTYPE.itemsize:
        skipped[_REASON["bad_record"]] += count
      elif not r:
        skipped[_REASON["empty"]] += count
      else:
        docs.append(np.frombuffer(r, RECORD_DTYPE))
    lengths = np.array([len(d) for d in docs], np.int32)
    flat = np.concatenate(docs).astype(np.int32) if docs else np.zeros(0, np.int32)
    if flat.size and (flat.min() < 0 or flat.max() >= self.n_vocab):  # rare: find the offending documents
      ok = np.array([d.min() >= 0 and d.max() < self.n_vocab for d in docs])
      skipped[_REASON["bad_record"]] += int((~ok).sum())  # (pass 0 only would need indices per doc: rare enough)
      docs = [d for d, good in zip(docs, ok) if good]
      lengths = lengths[ok]
      flat = np.concatenate(docs).astype(np.int32) if docs else np.zeros(0, np.int32)
    return _with_eos(flat, lengths, self.eos_id, skipped, ends)


def _with_eos(flat: np.ndarray, lengths: np.ndarray, eos_id: int, skipped: np.ndarray,
              ends: int = 0) -> dict[str, np.ndarray]:
  doc_ends = np.cumsum(lengths)
  tokens = np.insert(flat, doc_ends, np.int32(eos_id)).astype(np.int32, copy=False)
  return {"tokens": tokens, "lengths": lengths + 1, "skipped": skipped, "ends": np.int64(ends)}


def _with_index(index: int, record: bytes) -> tuple[int, bytes]:
  return index, record


def _file_shards(src: ResolvedSource, shard: int, num_shards: int) -> list[_FileShard]:
  if len(src.files) % num_shards == 0:
    return [_FileShard(f, 0, 1) for f in src.files[shard::num_shards]]
  return [_FileShard(f, shard, num_shards) for f in src.files]


def ends_per_pass(src: ResolvedSource, num_shards: int) -> int:
  """How many `ends` a block stream of one of `num_shards` shards counts per pass over its part of the source."""
  return 1 if src.format == "arrayrecord" else len(_file_shards(src, 0, num_shards))


def block_dataset(src: ResolvedSource, tokenizer: Arcade100k, *, seed: int, shuffle: bool, shuffle_window: int,
                  shard: int = 0, num_shards: int = 1, chat_template: str = "",
                  loss_on: str = "assistant") -> grain.IterDataset:
  """The endless (epoch after epoch) stream of blocks of shard `shard` of `num_shards` of one source."""
  if src.format == "arrayrecord":
    records = grain.MapDataset.source(grain.sources.ArrayRecordDataSource(list(src.files)))
    if len(records) < num_shards:
      raise ConfigError(f"data.sources[{src.index}] has {len(records)} records, fewer than the "
                        f"{num_shards} virtual shards (data.virtual_shards) that each need some")
    records = records[shard::num_shards]
    n = len(records)
    if shuffle:
      records = records.shuffle(seed=seed)
    records = records.repeat().map_with_index(_with_index)
    blocks = records.batch(DOCS_PER_BLOCK, batch_fn=DecodeBlock(tokenizer.eos_id, tokenizer.n_vocab, n))
    return blocks.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
  shards = _file_shards(src, shard, num_shards)
  files = grain.MapDataset.source(shards)
  if shuffle and len(shards) > 1:
    files = files.shuffle(seed=seed)
  files = files.repeat().map_with_index(_OpenFile(src, len(shards)))
  if len(shards) == 1:  # one file: read it pass after pass in this thread (a thread per pass costs more)
    records: grain.IterDataset = _ChainIterDataset(files)
  else:
    # Each open file is read ahead on its own thread; a deep buffer saves a thread hand-off per record.
    records = grain.experimental.InterleaveIterDataset(files, cycle_length=min(len(shards), _FILES_OPEN_PER_SOURCE),
                                                       iter_buffer_size=_RECORDS_BUFFERED_PER_FILE)
  if shuffle:
    records = grain.experimental.WindowShuffleIterDataset(records, window_size=shuffle_window, seed=seed)
  if src.format == "chat":
    return records.batch(DOCS_PER_BLOCK, batch_fn=ChatTokenizeBlock(tokenizer, chat_template, loss_on))
  return records.batch(DOCS_PER_BLOCK, batch_fn=TokenizeBlock(tokenizer))

