"""The batch schema: the arrays a batch holds, what they mean, and their dtype.

A batch is a dict of int32 arrays, [B, T] each (B rows, T tokens per row): grain yields it,
`sharding.global_batch` places it, and the jitted train step, the evaluator and the harness take
it. One definition here, so that the data pipeline, the step, `evaluate` and `harness` agree.
"""

from __future__ import annotations

import jax
import numpy as np

DTYPE = np.int32  # every batch array: token ids, ids of segments and positions, 0/1 flags

FIELDS = {
    "tokens": "token ids (any id under padding: segment 0 masks it out)",
    "segment_ids": "1, 2, 3, ... per document piece packed into the row; 0 = padding (attends to and scores nothing)",
    "positions": "each token's position within its document, from 0 (the rotary embedding's input)",
    "loss_mask": "1 = the token is a scored target: every token of plain text, the assistant turns of a conversation",
}
INPUT_KEYS = ("tokens", "segment_ids", "positions")  # [B, T]: what the model reads
KEYS = tuple(FIELDS)  # [B, T]: a train or evaluation batch, the model's inputs and the loss mask

# The harness's scoring rows: INPUT_KEYS [B, T], plus [B, S] of the S positions scored in each row.
SCORE_KEYS = ("score_index", "score_targets")  # [B, S]: the row positions scored and the next token at each


def abstract(rows: int, length: int, keys: tuple[str, ...] = KEYS) -> dict[str, jax.ShapeDtypeStruct]:
  """The ShapeDtypeStructs of a batch of `rows` x `length`, for lowering a function ahead of time."""
  return {k: jax.ShapeDtypeStruct((rows, length), DTYPE) for k in keys}


def zeros(rows: int, length: int, keys: tuple[str, ...] = KEYS) -> dict[str, np.ndarray]:
  """An empty (all padding) host batch, to be filled row by row."""
  return {k: np.zeros((rows, length), DTYPE) for k in keys}
