"""Concat-then-split packing of one language stream into rows of exactly seq_len tokens.

Method: documents (each followed by its EOS) are concatenated in stream order and the stream is
cut every seq_len tokens. A document that crosses a cut continues at the start of the next row,
so documents longer than a row are split over as many rows as they need.

Why this and not first-fit / best-fit bin packing: it wastes nothing (no padding, ever, so the
trainer spends every FLOP on real tokens), each row holds tokens of one stream only (so mixing
rows by weight gives exactly the configured token share per language), it needs no look-ahead
buffer of documents, and it cuts with a reshape, so it is a handful of numpy operations per
few hundred thousand tokens. The cost is that a document cut at a row boundary loses the
attention context of its first part; with 4096-token rows that touches one document per row,
which is what Llama-, OLMo- and GPT-style pretraining accept. Padding is still measured and
reported (it is 0 with this method).

Each row carries `segment_ids` (1, 2, 3, ... per document piece within the row; 0 would be
padding), `positions` (restarting at 0 at each document start and at each row start) and
`loss_mask` (1 where the token is a scored target: every token of plain text; the assistant turns
of a chat conversation, from the block's own `loss_mask`, see `chat`).

Conversations are documents here: each is its own segment, and one that crosses a row boundary
(or is longer than a row) continues in the next row as a new segment, its loss mask cut with it.
Its scored tokens there are still scored, with the context of that row's part only, exactly as a
long pre-training document is treated; rows hold whole conversations when seq_len exceeds them,
which is the case to aim for in fine-tuning (see docs/finetuning.md).

Checkpointing: the packer reads *blocks* of documents (see `data_sources`) and remembers, for the
next row it will emit, the parent's state before the block that row starts in plus the token
offset into that block. Restoring re-reads that block and drops the offset, so the following
rows are identical; the state stays a few integers however long the documents are.
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import grain
import numpy as np

from ar_lm_jax.data_sources import SKIP_REASONS

_TOKENS_PER_FILL = 1 << 16  # tokens cut into rows at once, to amortize numpy call overhead...
_ROWS_PER_FILL = 64  # ...but no more rows than this, so short rows do not read far ahead
_MAX_EMPTY_BLOCKS = 2000  # consecutive blocks without a document after which a source is declared unusable


def pack_rows(tokens: np.ndarray, doc_start: np.ndarray, seq_len: int,
              loss_mask: Optional[np.ndarray] = None) -> dict[str, np.ndarray]:
  """Cuts `tokens` (a whole number of rows long) into rows with segment ids, positions and loss mask.

  `doc_start` marks the first token of every document; a row start also starts a segment.
  `loss_mask` (default: all ones) marks the tokens that are scored targets.
  """
  n = tokens.size // seq_len
  assert tokens.size == n * seq_len and doc_start.size == tokens.size
  starts_NL = doc_start.reshape(n, seq_len).copy()
  starts_NL[:, 0] = True
  segment_ids_NL = np.cumsum(starts_NL, axis=1, dtype=np.int32)
  idx_L = np.arange(seq_len, dtype=np.int32)
  last_start_NL = np.maximum.accumulate(np.where(starts_NL, idx_L, 0), axis=1)
  return {
      "tokens": tokens.reshape(n, seq_len).astype(np.int32, copy=False),
      "segment_ids": segment_ids_NL,
      "positions": (idx_L - last_start_NL).astype(np.int32),
      "loss_mask": (np.ones((n, seq_len), np.int32) if loss_mask is None
                    else loss_mask.reshape(n, seq_len).astype(np.int32)),
  }


class _PackIterator(grain.DatasetIterator):
  """Rows of one stream: `tokens`, `segment_ids`, `positions` [seq_len], `skipped` [reasons], `ends` [], `source` []."""

  def __init__(self, parent: grain.DatasetIterator, seq_len: int, source: int, name: str):
    super().__init__(parent)
    self._seq_len, self._source, self._name = seq_len, np.int32(source), name
    # Blocks read but not yet fully cut into rows, each with the parent state just before it.
    self._pending: list[tuple[Any, dict[str, np.ndarray]]] = []
    self._offset = 0  # tokens of pending[0] (or of the next block read, if none) already in emitted rows
    self._parent_state = copy.deepcopy(parent.get_state())  # before the next block to read
    self._rows: Optional[dict[str, np.ndarray]] = None  # rows cut but not yet emitted
    self._row_states: list[tuple[Any, int]] = []  # (parent state, offset) from which each such row starts
    self._next_row = 0

  def __next__(self) -> dict[str, np.ndarray]:
    if self._rows is None or self._next_row == len(self._row_states):
      self._fill()
    r = self._next_row
    self._next_row += 1
    row = {k: v[r] for k, v in self._rows.items()}
    row["source"] = self._source
    return row

  def _fill(self) -> None:
    """Reads blocks until enough tokens are pending, then cuts all whole rows at once.

    Training streams never end; a finite parent ends the rows at its last whole row.
    """
    L = self._seq_len
    have = sum(b["tokens"].size for _, b in self._pending) - self._offset
    want = L * max(1, min(_ROWS_PER_FILL, _TOKENS_PER_FILL // L))
    empty = 0
    while have < want:
      try:
        block = next(self._parent)
      except StopIteration:
        if have < L:
          raise
        break
      self._pending.append((self._parent_state, block))
      self._parent_state = copy.deepcopy(self._parent.get_state())
      n = block["tokens"].size
      have += n
      empty = 0 if n else empty + 1
      if empty >= _MAX_EMPTY_BLOCKS:  # the source has stopped yielding documents
        if have >= L:
          break
        skipped = sum(b["skipped"] for _, b in self._pending)
        counts = {r: int(c) for r, c in zip(SKIP_REASONS, skipped) if c}
        raise RuntimeError(f"data source {self._name}: no usable document in the last {empty} blocks read "
                           f"(skipped: {counts or 'none'}, or the files are empty)")
    blocks = [b for _, b in self._pending]
    sizes = np.array([b["tokens"].size for b in blocks], np.int64)
    # Block starts in stream coordinates, where emitted rows end at 0 (pending[0] starts at -offset).
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]) - self._offset
    ends = starts + sizes
    flat = np.concatenate([blocks[0]["tokens"][self._offset:]] + [b["tokens"] for b in blocks[1:]])
    masks = [b.get("loss_mask") for b in blocks]  # chat blocks carry one; plain text scores every token
    flat_mask = None
    if any(m is not None for m in masks):
      masks = [np.ones(b["tokens"].size, np.uint8) if m is None else m for m, b in zip(masks, blocks)]
      flat_mask = np.concatenate([masks[0][self._offset:]] + masks[1:])
    n_rows = flat.size // L
    cut = n_rows * L
    doc_starts = np.concatenate([s + np.cumsum(b["lengths"], dtype=np.int64) - b["lengths"]
                                 for s, b in zip(starts, blocks)])
    doc_starts = doc_starts[(doc_starts >= 0) & (doc_starts < cut)]
    is_start = np.zeros(cut, bool)
    is_start[doc_starts] = True
    rows = pack_rows(flat[:cut], is_start, L, None if flat_mask is None else flat_mask[:cut])
    # A block's skip counts go to the row its first token falls in (blocks already begun were counted).
    skipped = np.zeros((n_rows, len(SKIP_REASONS)), np.int64)
    counted = (starts >= 0) & (starts < cut)
    np.add.at(skipped, starts[counted] // L, np.stack([b["skipped"] for b in blocks])[counted])
    rows["skipped"] = skipped
    # Pass ends (epochs, see data_sources) travel the same way.
    pass_ends = np.zeros(n_rows, np.int64)
    np.add.at(pass_ends, starts[counted] // L, np.array([b.get("ends", 0) for b in blocks], np.int64)[counted])
    rows["ends"] = pass_ends
    # Where each row (and the stream after the last one) starts: the block holding that token, or
    # the first block beginning exactly there (so empty blocks at a boundary are re-read on restore).
    at = np.arange(n_rows + 1, dtype=np.int64) * L
    j = np.searchsorted(starts, at, side="left")
    inside_previous = (j > 0) & (ends[np.maximum(j - 1, 0)] > at)
    j = np.where(inside_previous, j - 1, j)
    states = [s for s, _ in self._pending] + [self._parent_state]
    self._row_states = [(states[jj], int(a - starts[jj]) if jj < len(blocks) else 0) for jj, a in zip(j[:-1], at[:-1])]
    tail = int(j[-1])
    self._offset = int(at[-1] - starts[tail]) if tail < len(blocks) else 0
    self._pending = self._pending[tail:]
    self._rows, self._next_row = rows, 0

  def get_state(self) -> dict[str, Any]:
    if self._rows is not None and self._next_row < len(self._row_states):
      state, offset = self._row_states[self._next_row]
    elif self._pending:
      state, offset = self._pending[0][0], self._offset
    else:
      state, offset = self._parent_state, self._offset
    return {"parent": copy.deepcopy(state), "offset": offset}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._parent_state = copy.deepcopy(state["parent"])
    self._pending, self._offset = [], state["offset"]
    self._rows, self._row_states, self._next_row = None, [], 0

  def __str__(self) -> str:
    return f"PackIterator(seq_len={self._seq_len}, source={self._name})"


class PackIterDataset(grain.IterDataset):
  """Packs a stream of blocks (see `data_sources`) into rows of exactly `seq_len` tokens."""

  def __init__(self, parent: grain.IterDataset, seq_len: int, *, source: int, name: str):
    super().__init__(parent)
    self._seq_len, self._source, self._name = seq_len, source, name

  def __iter__(self) -> _PackIterator:
    return _PackIterator(self._parent.__iter__(), self._seq_len, self._source, self._name)

  def __str__(self) -> str:
    return f"PackIterDataset(seq_len={self._seq_len}, source={self._name})"
