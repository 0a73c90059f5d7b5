"""Tests for ar_lm_jax.packing: row invariants, document splitting, EOS placement, exact resume."""

from __future__ import annotations

import json

import grain
import numpy as np
import pytest

from ar_lm_jax.data_sources import SKIP_REASONS
from ar_lm_jax.packing import PackIterDataset, pack_rows

EOS = 0


def make_blocks(seed=0, n_blocks=60, max_len=70, empty_every=7):
  """Blocks of documents with ids that say where they come from: doc k is [k*1000+1, k*1000+2, ...] + EOS."""
  rng = np.random.default_rng(seed)
  blocks, k = [], 0
  for b in range(n_blocks):
    docs = []
    if b % empty_every != 3:  # some blocks hold only skipped records
      for _ in range(rng.integers(1, 5)):
        k += 1
        docs.append(np.concatenate([k * 1000 + 1 + np.arange(rng.integers(1, max_len)), [EOS]]).astype(np.int32))
    skipped = np.zeros(len(SKIP_REASONS), np.int64)
    skipped[b % len(SKIP_REASONS)] = b + 1
    blocks.append({"tokens": np.concatenate(docs) if docs else np.zeros(0, np.int32),
                   "lengths": np.array([len(d) for d in docs], np.int32), "skipped": skipped})
  return blocks


def block_stream(blocks):
  # A finite MapDataset stands in for a source's block stream; rows stop when it runs out.
  return grain.MapDataset.source(blocks).to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))


def packed(blocks, seq_len):
  return PackIterDataset(block_stream(blocks), seq_len, source=1, name="test")


def take(it, n):
  return [next(it) for _ in range(n)]


def test_pack_rows_segments_and_positions():
  tokens = np.arange(12, dtype=np.int32)
  starts = np.zeros(12, bool)
  starts[[0, 3, 4, 9]] = True
  rows = pack_rows(tokens, starts, 6)
  assert rows["tokens"].tolist() == [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]]
  assert rows["segment_ids"].tolist() == [[1, 1, 1, 2, 3, 3], [1, 1, 1, 2, 2, 2]]
  assert rows["positions"].tolist() == [[0, 1, 2, 0, 0, 1], [0, 1, 2, 0, 1, 2]]


@pytest.mark.parametrize("seq_len", [8, 33, 128])
def test_rows_are_full_and_reassemble_the_stream(seq_len):
  blocks = make_blocks()
  stream = np.concatenate([b["tokens"] for b in blocks])
  rows = list(packed(blocks, seq_len))
  assert len(rows) == stream.size // seq_len  # the partial tail is never emitted
  for r in rows:
    assert r["tokens"].shape == r["segment_ids"].shape == r["positions"].shape == (seq_len,)
    assert r["tokens"].dtype == r["segment_ids"].dtype == r["positions"].dtype == np.int32
    assert int(r["source"]) == 1
  tokens = np.stack([r["tokens"] for r in rows])
  np.testing.assert_array_equal(tokens.ravel(), stream[: tokens.size])
  for r in rows:
    seg, pos, tok = r["segment_ids"], r["positions"], r["tokens"]
    assert seg[0] == 1 and pos[0] == 0 and seg.min() >= 1  # no padding with concat-then-split
    assert np.all(np.diff(seg) >= 0) and np.all(np.diff(seg) <= 1)
    new = np.diff(seg) == 1
    # A new segment starts exactly after an EOS, and EOS is the last token of its own segment.
    np.testing.assert_array_equal(new, tok[:-1] == EOS)
    # Positions count up within a segment and restart at each segment.
    np.testing.assert_array_equal(pos[1:], np.where(new, 0, pos[:-1] + 1))
    # Within a segment, tokens are one document: doc k's tokens all share k (k*1000 + i).
    for s in np.unique(seg):
      body = tok[(seg == s) & (tok != EOS)]
      assert len(np.unique(body // 1000)) <= 1


def test_long_documents_split_over_rows():
  doc = np.concatenate([1 + np.arange(50), [EOS]]).astype(np.int32)
  block = {"tokens": doc, "lengths": np.array([51], np.int32), "skipped": np.zeros(len(SKIP_REASONS), np.int64)}
  rows = list(packed([block] * 3, 16))
  assert len(rows) == 153 // 16
  np.testing.assert_array_equal(rows[0]["tokens"], 1 + np.arange(16))
  np.testing.assert_array_equal(rows[1]["positions"], np.arange(16))  # a continuation starts again at 0
  assert rows[3]["tokens"][2] == EOS and rows[3]["segment_ids"].tolist() == [1] * 3 + [2] * 13


def test_skip_counts_and_pass_ends_are_carried_once():
  blocks = [dict(b, ends=np.int64(i % 3 == 0)) for i, b in enumerate(make_blocks())]
  rows = list(packed(blocks, 16))
  # Every block that begins before the end of the last row is counted exactly once.
  stream_len = len(rows) * 16
  starts = np.cumsum([0] + [b["tokens"].size for b in blocks])[:-1]
  for key in ("skipped", "ends"):
    expected = sum(b[key] for b, s in zip(blocks, starts) if s < stream_len)
    np.testing.assert_array_equal(sum(r[key] for r in rows), expected)


@pytest.mark.parametrize("seq_len", [8, 50])
def test_resume_is_exact_from_any_row(seq_len):
  blocks = make_blocks(seed=1)
  ds = packed(blocks, seq_len)
  it = ds.__iter__()
  reference = list(ds)
  states = [json.loads(json.dumps(it.get_state()))]
  for _ in range(len(reference)):
    next(it)
    states.append(json.loads(json.dumps(it.get_state())))
  for k in list(range(0, len(reference), max(1, len(reference) // 15))) + [len(reference) - 1]:
    again = ds.__iter__()
    again.set_state(states[k])
    rest = [next(again) for _ in range(min(20, len(reference) - k))]
    for a, b in zip(rest, reference[k:]):
      for key in a:
        np.testing.assert_array_equal(a[key], b[key])
  again.set_state(states[-1])
  with pytest.raises(StopIteration):
    next(again)


def test_a_source_without_documents_fails_with_a_message():
  skipped = np.zeros(len(SKIP_REASONS), np.int64)
  skipped[1] = 64
  empty = {"tokens": np.zeros(0, np.int32), "lengths": np.zeros(0, np.int32), "skipped": skipped}
  blocks = make_blocks(n_blocks=2) + [empty] * 5000
  it = PackIterDataset(block_stream(blocks), 8, source=0, name="0:en").__iter__()
  rows = 0
  with pytest.raises(RuntimeError, match=r"data source 0:en: no usable document in the last 2000 blocks.*missing_field"):
    while True:
      next(it)
      rows += 1
  assert rows > 0  # the rows there were came out first
