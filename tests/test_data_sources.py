"""Tests for ar_lm_jax.data_sources: formats, paths, bad input, resumable reading, host shards."""

from __future__ import annotations

import collections
import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from array_record.python.array_record_module import ArrayRecordWriter

from ar_lm_jax import chat
from ar_lm_jax import data_sources as ds
from ar_lm_jax.config import ConfigError, SourceConfig
from ar_lm_jax.tokenizer import load_tokenizer

DOCS = [f"document {i} " + "word " * (i % 7) for i in range(40)]


def write_jsonl(path, docs, compress=None, extra_lines=()):
  text = "".join(json.dumps({"text": d, "lang": "en"}, ensure_ascii=False) + "\n" for d in docs)
  raw = text.encode() + b"".join(extra_lines)
  if compress == "gz":
    raw = gzip.compress(raw)
  elif compress == "zst":
    raw = zstandard.ZstdCompressor().compress(raw)
  path.write_bytes(raw)
  return str(path)


def write_arrayrecord(path, docs_ids):
  w = ArrayRecordWriter(str(path), "group_size:1")
  for ids in docs_ids:
    w.write(np.asarray(ids, "<i4").tobytes())
  w.close()
  return str(path)


def resolve(path, fmt="auto", **kw):
  return ds.resolve_source(SourceConfig(path=str(path), lang="en", format=fmt, **kw), 0)


def docs_of(src, shard=0, num_shards=1):
  skipped = np.zeros(len(ds.SKIP_REASONS), np.int64)
  docs = list(ds.iter_documents(src, shard, num_shards, skipped))
  return docs, {r: int(n) for r, n in zip(ds.SKIP_REASONS, skipped) if n}


@pytest.mark.parametrize("compress", [None, "gz", "zst"])
def test_jsonl_plain_and_compressed(tmp_path, compress):
  name = "a.jsonl" + {None: "", "gz": ".gz", "zst": ".zst"}[compress]
  src = resolve(write_jsonl(tmp_path / name, DOCS, compress))
  assert src.format == "jsonl"
  assert docs_of(src) == (DOCS, {})


def test_parquet_with_configurable_column(tmp_path):
  pq.write_table(pa.table({"body": DOCS, "n": list(range(len(DOCS)))}), tmp_path / "a.parquet", row_group_size=7)
  src = resolve(tmp_path / "a.parquet", text_field="body")
  assert src.format == "parquet"
  assert docs_of(src) == (DOCS, {})
  with pytest.raises(ConfigError, match=r"data.sources\[0\].*no column 'text'"):
    resolve(tmp_path / "a.parquet")


def test_plain_text_lines_and_paragraphs(tmp_path):
  (tmp_path / "a.txt").write_text("first line\n\nsecond line\nthird line\n\n\nlast\n")
  assert docs_of(resolve(tmp_path / "a.txt"))[0] == ["first line\n", "second line\n", "third line\n", "last\n"]
  para = resolve(tmp_path / "a.txt", text_unit="paragraph")
  assert docs_of(para)[0] == ["first line\n", "second line\nthird line\n", "last\n"]


def test_paths_file_glob_directory(tmp_path):
  for i in range(3):
    write_jsonl(tmp_path / f"part-{i}.jsonl", DOCS[i::3])
  (tmp_path / "sub").mkdir()
  write_jsonl(tmp_path / "sub" / "part-9.jsonl.gz", DOCS[:2], "gz")
  assert len(resolve(tmp_path / "part-0.jsonl").files) == 1
  assert len(resolve(tmp_path / "part-*.jsonl").files) == 3
  (tmp_path / "README.md").write_text("not data")
  assert len(resolve(tmp_path).files) == 4  # directories are walked; files of no known format are left out
  (tmp_path / "x.parquet").write_bytes(b"")
  assert len(resolve(tmp_path, fmt="jsonl").files) == 4  # an explicit format picks its files


def test_fatal_config_errors_name_the_source(tmp_path):
  with pytest.raises(ConfigError, match=r"data.sources\[0\] \(lang=en, path=.*nothing.*\): path matches no files"):
    resolve(tmp_path / "nothing*.jsonl")
  (tmp_path / "x.csv").write_text("a,b\n")
  with pytest.raises(ConfigError, match="unknown format"):
    resolve(tmp_path / "x.csv")
  (tmp_path / "mixed").mkdir()
  write_jsonl(tmp_path / "mixed" / "a.jsonl", DOCS)
  (tmp_path / "mixed" / "b.txt").write_text("x\n")
  with pytest.raises(ConfigError, match="several formats"):
    resolve(tmp_path / "mixed")
  with pytest.raises(ConfigError, match="no usable document"):  # a wrong text_field fails fast
    resolve(tmp_path / "mixed" / "a.jsonl", text_field="body")
  with pytest.raises(ConfigError, match="must be one of"):
    SourceConfig(path="x", lang="en", format="csv")


def test_bad_records_are_skipped_and_counted(tmp_path):
  bad = [b"{not json\n", b'{"other": "x"}\n', b'{"text": 3}\n', b"[1, 2]\n", b'{"text": ""}\n',
         b'{"text": "   "}\n', b'{"text": "caf\xe9"}\n', b'{"text": "lone \\ud800 surrogate"}\n', b"\n"]
  src = resolve(write_jsonl(tmp_path / "a.jsonl", DOCS[:3], extra_lines=bad))
  docs, skipped = docs_of(src)
  assert docs == DOCS[:3]
  assert skipped == {"malformed_json": 1, "missing_field": 3, "empty": 2, "invalid_utf8": 2}
  (tmp_path / "b.txt").write_bytes(b"good line\n\xff\xfe bad bytes\nalso good\n")
  assert docs_of(resolve(tmp_path / "b.txt")) == (["good line\n", "also good\n"], {"invalid_utf8": 1})


def test_truncated_compressed_file_is_counted_not_fatal(tmp_path):
  full = gzip.compress("".join(json.dumps({"text": d}) + "\n" for d in DOCS).encode())
  (tmp_path / "a.jsonl.gz").write_bytes(full[: len(full) // 2])
  docs, skipped = docs_of(resolve(tmp_path / "a.jsonl.gz"))
  assert 0 < len(docs) < len(DOCS) and docs == DOCS[: len(docs)]
  assert skipped == {"truncated_file": 1}


@pytest.mark.parametrize("name,compress", [("a.jsonl", None), ("a.jsonl.zst", "zst"), ("a.jsonl.gz", "gz")])
def test_reading_resumes_from_record_and_offset(tmp_path, name, compress):
  src = resolve(write_jsonl(tmp_path / name, DOCS, compress))
  steps = list(ds.read_records(src, src.files[0], 0, 1))
  _, record, offset = steps[16]
  rest = [item for item, _, _ in ds.read_records(src, src.files[0], 0, 1, record, offset)]
  assert rest == DOCS[17:]


def test_parquet_resumes_mid_row_group(tmp_path):
  pq.write_table(pa.table({"text": DOCS}), tmp_path / "a.parquet", row_group_size=6)
  src = resolve(tmp_path / "a.parquet")
  _, record, _ = list(ds.read_records(src, src.files[0], 1, 2))[5]  # record 11, the 6th of shard 1
  assert [x for x, _, _ in ds.read_records(src, src.files[0], 1, 2, record)] == DOCS[13::2]


def test_record_shards_are_disjoint_and_complete(tmp_path):
  src = resolve(write_jsonl(tmp_path / "a.jsonl", DOCS))
  parts = [docs_of(src, p, 3)[0] for p in range(3)]
  assert sorted(sum(parts, [])) == sorted(DOCS)
  assert all(parts)


def _epoch_docs(src, process_index, process_count, seed=0, shuffle=True, blocks=None):
  """Documents (as token tuples, EOS dropped) from the first `blocks` blocks of a process's stream."""
  tok = load_tokenizer()
  it = ds.block_dataset(src, tok, seed=seed, shuffle=shuffle, shuffle_window=64, shard=process_index,
                        num_shards=process_count).__iter__()
  out = []
  for _ in range(blocks):
    b = next(it)
    assert b["tokens"].size == b["lengths"].sum()
    for doc in np.split(b["tokens"], np.cumsum(b["lengths"])[:-1]):
      if doc.size:
        assert doc[-1] == tok.eos_id
        out.append(tuple(doc[:-1]))
  it.close()
  return out


@pytest.mark.parametrize("num_files", [2, 3])  # 2 files: whole files per process; 3: record striding
def test_process_shards_of_streamed_source(tmp_path, num_files):
  for i in range(num_files):
    write_jsonl(tmp_path / f"p{i}.jsonl", DOCS[i::num_files])
  src = resolve(tmp_path / "p*.jsonl")
  tok = load_tokenizer()
  ids = {tuple(tok.encode(d)): d for d in DOCS}
  # One block of 64 spans more than an epoch of a process's 20 documents: take the first epoch.
  first = [set(_epoch_docs(src, p, 2, blocks=1)) for p in range(2)]
  assert not first[0] & first[1]
  assert {ids[d] for d in first[0] | first[1]} == set(DOCS)


def test_streamed_source_reshuffles_each_epoch(tmp_path):
  for i in range(5):
    write_jsonl(tmp_path / f"p{i}.jsonl", DOCS[i::5])
  src = resolve(tmp_path / "p*.jsonl")
  docs = _epoch_docs(src, 0, 1, blocks=6)[:160]  # 4 epochs of 40 documents
  counts = collections.Counter(docs)
  assert len(counts) == 40 and min(counts.values()) >= 3  # every document comes back...
  assert docs[:40] != docs[40:80] != docs[80:120]  # ...in a new order


def test_arrayrecord_shards_epochs_and_seeds(tmp_path):
  n = 300
  write_arrayrecord(tmp_path / "a.array_record", [[i + 1] * (1 + i % 5) for i in range(n // 2)])
  write_arrayrecord(tmp_path / "b.array_record", [[i + 1] * (1 + i % 5) for i in range(n // 2, n)])
  src = resolve(tmp_path)
  assert src.format == "arrayrecord"
  # 3 processes of 100 documents each; 4 blocks of 64 = 2.56 epochs.
  streams = [[d[0] for d in _epoch_docs(src, p, 3, blocks=4)] for p in range(3)]
  epochs = [[s[:100], s[100:200]] for s in streams]
  for e0, e1 in epochs:
    assert sorted(e0) == sorted(e1) and len(set(e0)) == 100  # each epoch is a permutation...
    assert e0 != e1  # ...reshuffled
  assert sorted(sum((e[0] for e in epochs), [])) == list(range(1, n + 1))  # disjoint and complete
  assert streams[0] == [d[0] for d in _epoch_docs(src, 0, 3, blocks=4)]  # same seed, same order
  assert streams[0] != [d[0] for d in _epoch_docs(src, 0, 3, seed=1, blocks=4)]
  assert [d[0] for d in _epoch_docs(src, 0, 1, shuffle=False, blocks=1)] == list(range(1, 65))


def test_decode_block_skips_bad_records():
  block = ds.DecodeBlock(eos_id=9, n_vocab=10)([np.array([1, 2], "<i4").tobytes(), b"", b"\x00\x01\x02",
                                               np.array([3, 99], "<i4").tobytes(), np.array([4], "<i4").tobytes()])
  assert block["tokens"].tolist() == [1, 2, 9, 4, 9]
  assert block["lengths"].tolist() == [3, 2]
  assert dict(zip(ds.SKIP_REASONS, block["skipped"].tolist())) == {
      "malformed_json": 0, "missing_field": 0, "empty": 1, "invalid_utf8": 0, "truncated_file": 0, "bad_record": 2,
      **{r: 0 for r in chat.SKIP_REASONS}}  # the chat reasons (format=chat) count nothing here


def test_decode_block_counts_bad_records_in_the_first_pass_only_and_pass_ends():
  good, bad = np.array([1, 2], "<i4").tobytes(), b"\x00\x01\x02"
  decode = ds.DecodeBlock(eos_id=9, n_vocab=10, records_per_pass=2)
  first = decode([(0, good), (1, bad)])  # pass 0: the bad record counts; record 1 ends the pass
  again = decode([(2, good), (3, bad), (4, good)])  # pass 1: re-read, not re-counted
  assert first["skipped"][ds.SKIP_REASONS.index("bad_record")] == 1 and first["ends"] == 1
  assert again["skipped"].sum() == 0 and again["ends"] == 1
  assert again["tokens"].tolist() == [1, 2, 9, 1, 2, 9]


def test_streamed_skips_are_counted_once_over_many_passes(tmp_path):
  path = write_jsonl(tmp_path / "a.jsonl", DOCS[:3], extra_lines=[b"{broken\n"])
  src = resolve(path)
  it = ds.block_dataset(src, load_tokenizer(), seed=0, shuffle=False, shuffle_window=8).__iter__()
  blocks = [next(it) for _ in range(4)]  # 256 records: pass 0 has 5 (3 docs, the bad line, END_OF_FILE), later ones 4
  it.close()
  assert sum(b["skipped"][ds.SKIP_REASONS.index("malformed_json")] for b in blocks) == 1
  assert sum(int(b["ends"]) for b in blocks) == 1 + (256 - 5) // 4 and ds.ends_per_pass(src, 1) == 1
