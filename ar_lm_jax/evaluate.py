"""Held-out evaluation per language: loss, perplexity and bits per byte.

How a document is scored. Its text is NFC-normalized and encoded with Arcade100k
(no special tokens: no BOS, no EOS, and special-token strings in the text stay
text), then truncated to `data.seq_len` tokens.
Token t+1 is predicted from tokens 0..t, so a document of n tokens gives n-1
predictions: its first token has nothing to be predicted from. A language's
loss is the mean NLL over all its predictions (documents weighted by their
tokens), and its perplexity is exp(loss).

Bits per byte are what compare across languages (Arcade100k splits Arabic into
about three times more tokens per word than English): the NLL in bits divided by
the UTF-8 bytes of the text that was predicted, i.e. of tokens 1..n-1.
Arcade100k is byte-level, so these are exactly the NFC document's bytes less its
first token's and less any truncated tail. `bytes` in the results is that
count; `text_bytes` is the bytes of the whole NFC documents. (Dividing by
`text_bytes` would credit the model with the unpredicted first token's bytes.)

Conversations (records with "messages", or "prompt" and "response", see `chat`) are scored on
their responses only, the tokens the fine-tuning loss counts (each assistant turn's content and
end marker): `tokens` is that count, the loss their mean NLL, and bits per byte that NLL over the
UTF-8 bytes of the scored text tokens (an end marker is a special id, with no bytes of text).
Records with bad messages are skipped and counted in the "all" line's `skipped`.

Documents are packed whole into rows of `seq_len` (first-fit decreasing), each
with its own segment id and positions from 0, so the model's segment masking
makes a packed document score exactly as it would alone; rows go through one
compiled function, batch after batch, in the run's shardings.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import sys
import unicodedata
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from ar_lm_jax import aot
from ar_lm_jax import batch as batch_lib
from ar_lm_jax import chat, data_sources, saved_run, sharding
from ar_lm_jax import step as step_lib
from ar_lm_jax.config import Config, ConfigError, SourceConfig
from ar_lm_jax.errors import UserError
from ar_lm_jax.tokenizer import Arcade100k, load_tokenizer


class EvalError(UserError):
  """Unusable evaluation input: a missing file, a malformed JSONL line, a bad flag."""


@dataclasses.dataclass
class Corpus:
  """One language's documents, tokenized and packed on the host."""
  lang: str
  docs: int
  tokens: int  # predictions scored
  bytes: int  # UTF-8 bytes of the predicted text (see the module docstring)
  text_bytes: int  # UTF-8 bytes of the whole NFC documents
  rows: dict[str, np.ndarray]  # batch.KEYS [R, seq_len]
  skipped: Optional[dict[str, int]] = None  # conversations skipped, per reason (chat corpora)


def nfc_bytes(text: str) -> int:
  return len(unicodedata.normalize("NFC", text).encode("utf-8"))


def encode_corpus(lang: str, texts: Sequence[str], tok: Arcade100k, seq_len: int) -> Corpus:
  kept = [np.asarray(x[:seq_len], np.int32) for x in tok.encode_batch(list(texts))]
  return Corpus(lang=lang, docs=len(texts), tokens=sum(max(len(x) - 1, 0) for x in kept),
                bytes=sum(len(tok.decode_bytes(x[1:])) for x in kept), text_bytes=sum(nfc_bytes(t) for t in texts),
                rows=pack_documents(kept, seq_len))


def encode_chat_corpus(lang: str, conversations: Sequence[Sequence[dict]], tok: Arcade100k, seq_len: int,
                       template: str = "", skipped: Optional[dict[str, int]] = None) -> Corpus:
  """Conversations rendered with the chat template and truncated to seq_len; responses scored (module doc)."""
  docs, masks = [], []
  skipped = dict(skipped or {})
  for messages in conversations:
    try:
      ids, mask = chat.render(messages, template, tokenizer=tok)
    except chat.ChatError as e:
      skipped[e.reason] = skipped.get(e.reason, 0) + 1
      continue
    docs.append(ids[:seq_len])
    masks.append(mask[:seq_len])
  scored = [d[1:][m[1:] > 0] for d, m in zip(docs, masks)]  # the first token is never predicted
  text_bytes = sum(len(tok.decode_bytes(x[x < tok.eos_id])) for x in scored)
  return Corpus(lang=lang, docs=len(docs), tokens=sum(int(m[1:].sum()) for m in masks), bytes=text_bytes,
                text_bytes=text_bytes, rows=pack_documents(docs, seq_len, masks), skipped=skipped)


def pack_documents(docs: Sequence[np.ndarray], seq_len: int,
                   masks: Optional[Sequence[np.ndarray]] = None) -> dict[str, np.ndarray]:
  """First-fit decreasing into rows [R, seq_len]: segment ids 1, 2, ... per document, 0 for padding.

  `masks` (default: all ones): per document, which tokens are scored targets (`loss_mask`).
  """
  order = sorted(range(len(docs)), key=lambda i: -len(docs[i]))
  order = [i for i in order if len(docs[i]) > 1]  # a single token predicts nothing
  free = np.zeros(0, np.int64)
  placed: list[list[int]] = []
  for i in order:
    n = len(docs[i])
    assert n <= seq_len
    fits = np.flatnonzero(free >= n)
    if fits.size:
      r = int(fits[0])
    else:
      r = len(placed)
      placed.append([])
      free = np.append(free, seq_len)
    placed[r].append(i)
    free[r] -= n
  rows = batch_lib.zeros(len(placed), seq_len)
  for r, members in enumerate(placed):
    at = 0
    for seg, i in enumerate(members, start=1):
      n = len(docs[i])
      rows["tokens"][r, at:at + n] = docs[i]
      rows["segment_ids"][r, at:at + n] = seg
      rows["positions"][r, at:at + n] = np.arange(n)
      rows["loss_mask"][r, at:at + n] = 1 if masks is None else masks[i]
      at += n
  return rows


class Scorer:
  """The sum of NLL over a stack of packed rows, one compiled function for every batch."""

  def __init__(self, setup: step_lib.Setup, batch_rows: int):
    self.setup = setup
    self.batch_rows = batch_rows
    self.seq_len = setup.cfg.data.seq_len
    self._batch_sharding = sharding.batch_sharding(setup.mesh)
    fn = jax.jit(self._nll_sum, in_shardings=(setup.state_shardings.params, {k: self._batch_sharding for k in batch_lib.KEYS}),
                 out_shardings=NamedSharding(setup.mesh, P()))
    abstract_batch = batch_lib.abstract(batch_rows, self.seq_len)
    with setup.activate():  # compiled once, here: evaluating again never recompiles
      self.compiled = aot.compile_fn(fn, setup.abstract_state.params, abstract_batch)

  def _nll_sum(self, params, batch):
    s_nll, _ = step_lib.loss_sums(self.setup.model, params, batch, self.setup.cfg)
    return s_nll

  def device_batches(self, rows: dict[str, np.ndarray]) -> Iterator[dict[str, jax.Array]]:
    """Rows cut into [batch_rows, seq_len] global arrays, the last padded with empty rows.

    Every process holds all rows, so each builds the shards it owns from the same numpy arrays.
    """
    B = self.batch_rows
    n = rows["tokens"].shape[0]
    for start in range(0, n, B):
      batch = {}
      for k in batch_lib.KEYS:
        x = np.zeros((B, self.seq_len), np.int32)
        x[:min(B, n - start)] = rows[k][start:start + B]
        batch[k] = jax.make_array_from_callback(x.shape, self._batch_sharding, lambda idx, x=x: x[idx])
      yield batch

  def nll_sum(self, params, batches: Iterable[dict[str, jax.Array]]) -> float:
    total = jnp.zeros((), jnp.float32)
    for batch in batches:  # dispatched back to back; the host waits once, at the end
      total = total + self.compiled(params, batch)
    return float(jax.device_get(total))


def result_line(lang: str, corpora: Sequence[Corpus], nll: float) -> dict[str, Any]:
  """The JSON line of one language (or of several together, as "all")."""
  tokens = sum(c.tokens for c in corpora)
  n_bytes = sum(c.bytes for c in corpora)
  loss = nll / tokens if tokens else None
  skipped: dict[str, int] = {}
  for c in corpora:
    for r, n in (c.skipped or {}).items():
      skipped[r] = skipped.get(r, 0) + n
  return {
      "lang": lang,
      "docs": sum(c.docs for c in corpora),
      "tokens": tokens,
      "bytes": n_bytes,
      "text_bytes": sum(c.text_bytes for c in corpora),
      "loss": loss,
      "perplexity": math.exp(loss) if loss is not None else None,
      "bits_per_byte": nll / math.log(2) / n_bytes if n_bytes else None,
  } | ({"skipped": skipped} if skipped else {})


def evaluate_corpora(scorer: Scorer, params, corpora: Sequence[Corpus]) -> list[dict[str, Any]]:
  """One result per language, in the given order, then "all"."""
  nlls = [scorer.nll_sum(params, scorer.device_batches(c.rows)) for c in corpora]
  lines = [result_line(c.lang, [c], nll) for c, nll in zip(corpora, nlls)]
  return lines + [result_line("all", corpora, sum(nlls))]


def group_by_lang(records: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
  """(lang, text) pairs -> texts per language, languages in order of first appearance."""
  by_lang: dict[str, list[str]] = {}
  for lang, text in records:
    by_lang.setdefault(lang, []).append(text)
  return by_lang


def read_jsonl(path: str | Path, max_docs: Optional[int] = None) -> list[tuple[str, str]]:
  """(lang, text) of the records of a JSONL file (plain, .gz or .zst, decompressed like training's sources)
  with "text" and "lang" fields, the first `max_docs` per language."""
  path = Path(path)
  if not path.is_file():
    raise EvalError(f"--data: {path} is not a file")
  out = []
  per_lang: dict[str, int] = {}
  f, _ = data_sources._open_binary(str(path))  # the readers' own decompression (gzip/zstd sniffed from the bytes)
  lineno = 0
  with f:
    try:
      for lineno, line in enumerate(f, start=1):
        if not line.strip():
          continue
        try:
          record = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
          raise EvalError(f"{path}:{lineno}: not valid UTF-8") from None
        except json.JSONDecodeError as e:
          raise EvalError(f"{path}:{lineno}: not valid JSON ({e})") from None
        if isinstance(record, dict) and "text" not in record and ("messages" in record or "prompt" in record):
          lang = record.get("lang") if isinstance(record.get("lang"), str) else "chat"
          if max_docs is None or per_lang.get(lang, 0) < max_docs:  # validated when rendered (skipped, counted)
            per_lang[lang] = per_lang.get(lang, 0) + 1
            out.append((lang, _conversation(record)))
          continue
        if not isinstance(record, dict) or not isinstance(record.get("text"), str) or not isinstance(record.get("lang"), str):
          raise EvalError(f"{path}:{lineno}: expected an object with string fields \"text\" and \"lang\" "
                          "(or give --lang to score every document as one language)")
        try:
          record["text"].encode("utf-8")
        except UnicodeEncodeError:  # a JSON escape of a lone surrogate
          raise EvalError(f"{path}:{lineno}: the text is not valid Unicode (a lone surrogate)") from None
        lang = record["lang"]
        if max_docs is None or per_lang.get(lang, 0) < max_docs:
          per_lang[lang] = per_lang.get(lang, 0) + 1
          out.append((lang, record["text"]))
    except (EOFError, OSError, ValueError) as e:  # a truncated or corrupt .gz/.zst (zstd raises ZstdError, a ValueError)
      if isinstance(e, EvalError):
        raise
      raise EvalError(f"{path}: cannot decompress it after line {lineno} ({type(e).__name__}: {e}); "
                      "is the file truncated?") from None
  if not out:
    raise EvalError(f"{path}: no documents")
  return out


def read_documents(path: str | Path, lang: Optional[str] = None, max_docs: Optional[int] = None) -> list[tuple[str, str]]:
  """(lang, text) pairs of `--data`: any format training reads (JSONL plain/.gz/.zst, Parquet, plain text).

  Without `lang`, a JSONL file whose records carry their "lang"; with it, every document of the file (or
  glob, or directory) as that language, read by the training sources' reader (its "text" field,
  one document per line for plain text)."""
  if lang is None:
    fmt = data_sources.format_of(str(path))
    if fmt not in (None, "jsonl"):
      raise EvalError(f"--data: {path} is {fmt}, whose records carry no language: give --lang=LANG")
    return read_jsonl(path, max_docs)
  src = data_sources.resolve_source(SourceConfig(path=str(path), lang=lang), 0, label=f"--data={path}")
  if src.format == "arrayrecord":
    raise EvalError(f"--data: {path} is pre-tokenized ArrayRecord; evaluation scores text (jsonl, parquet, text)")
  skipped = np.zeros(len(data_sources.SKIP_REASONS), np.int64)
  texts = list(itertools.islice(data_sources.iter_documents(src, skipped=skipped), max_docs))
  counts = {r: int(n) for r, n in zip(data_sources.SKIP_REASONS, skipped) if n}
  if counts.get("truncated_file"):  # scores over part of a file would pass for scores over all of it
    raise EvalError(f"--data: {path} ends early (a truncated file) after {len(texts)} document(s)")
  if counts:
    print(f"note: --data: skipped records of {path}: {counts}", file=sys.stderr)
  if not texts:
    raise EvalError(f"{path}: no documents")
  return [(lang, t) for t in texts]


def _conversation(record: dict) -> Any:
  """A chat record's messages, or the ChatError that makes it bad (counted when the corpus is rendered)."""
  try:
    return chat.messages_of(record)
  except chat.ChatError as e:
    return e


def encode_items(lang: str, items: Sequence[Any], tok: Arcade100k, cfg: Config) -> Corpus:
  """Texts, or conversations (message lists; a ChatError stands for a bad record, counted as skipped)."""
  texts = [x for x in items if isinstance(x, str)]
  if len(texts) == len(items):
    return encode_corpus(lang, items, tok, cfg.data.seq_len)
  if texts:
    raise EvalError(f"lang {lang!r}: the records mix texts and conversations; give them different langs")
  skipped: dict[str, int] = {}
  for x in items:
    if isinstance(x, chat.ChatError):
      skipped[x.reason] = skipped.get(x.reason, 0) + 1
  convs = [x for x in items if not isinstance(x, chat.ChatError)]
  return encode_chat_corpus(lang, convs, tok, cfg.data.seq_len, cfg.data.chat_template, skipped)


def fertility(texts: Sequence[str], tok: Arcade100k) -> dict[str, float]:
  """Tokens per whitespace-separated word and per UTF-8 byte (of the NFC text), whole documents."""
  tokens = sum(len(x) for x in tok.encode_batch(list(texts)))
  words = sum(len(t.split()) for t in texts)
  n_bytes = sum(nfc_bytes(t) for t in texts)
  return {"docs": len(texts), "words": words, "bytes": n_bytes, "tokens": tokens,
          "tokens_per_word": tokens / max(words, 1), "tokens_per_byte": tokens / max(n_bytes, 1)}


def heldout_texts(cfg: Config, max_docs: int) -> dict[str, list[str]]:
  """The first `max_docs` documents per language of `data.eval_sources` (sources of one language add up)."""
  tok = load_tokenizer(cfg.data.tokenizer_path)
  texts: dict[str, list[str]] = {}
  for i, src in enumerate(cfg.data.eval_sources):
    resolved = data_sources.resolve_source(src, i, tok, label=f"data.eval_sources[{i}] (lang={src.lang}, path={src.path!r})")
    if resolved.format == "arrayrecord":
      raise ConfigError(f"data.eval_sources[{i}]: evaluation reads text (jsonl, parquet, text), not pre-tokenized ArrayRecord")
    have = texts.setdefault(src.lang, [])
    have += itertools.islice(data_sources.iter_documents(resolved), max(max_docs - len(have), 0))
  return texts


# ---------------------------------------------------------------------------
# During training.


class TrainEvaluator:
  """Scores `data.eval_sources` (the first `train.eval_max_docs` documents of each language) in the train state's shardings.

  Documents are read, tokenized, packed and put on the devices once; each call only runs the
  compiled function over them.
  """

  def __init__(self, setup: step_lib.Setup):
    cfg = setup.cfg
    tok = load_tokenizer(cfg.data.tokenizer_path)
    texts = heldout_texts(cfg, cfg.train.eval_max_docs)
    self.corpora = [encode_items(lang, t, tok, cfg) for lang, t in texts.items()]
    self.scorer = Scorer(setup, cfg.data.batch_size // cfg.optim.grad_accum_steps)
    self.batches = [list(self.scorer.device_batches(c.rows)) for c in self.corpora]

  def __call__(self, params) -> dict[str, float]:
    """{"eval/LANG/loss", "eval/LANG/bpb"} for every language."""
    out = {}
    for corpus, batches in zip(self.corpora, self.batches):
      line = result_line(corpus.lang, [corpus], self.scorer.nll_sum(params, batches))
      out[f"eval/{corpus.lang}/loss"] = line["loss"]
      out[f"eval/{corpus.lang}/bpb"] = line["bits_per_byte"]
    return out


# ---------------------------------------------------------------------------
# From a saved run (the command-line tools and the notebook; `saved_run` reads it).


def evaluate_texts(run: saved_run.LoadedRun, by_lang: dict[str, list[str]]) -> list[dict[str, Any]]:
  """Per-language result lines (then "all") for texts grouped by language."""
  cfg = run.setup.cfg
  tok = load_tokenizer(cfg.data.tokenizer_path)
  corpora = [encode_items(lang, texts, tok, cfg) for lang, texts in by_lang.items()]
  return evaluate_corpora(Scorer(run.setup, cfg.data.batch_size), run.params, corpora)


def evaluate_file(path: str | Path, *, workdir: Optional[str] = None, checkpoint: Optional[str] = None,
                  step: Optional[int] = None, max_docs: Optional[int] = None,
                  batch_size: Optional[int] = None, lang: Optional[str] = None) -> list[dict[str, Any]]:
  """`experiments.evaluate`: a file's documents (`read_documents`) scored per language, by a training checkpoint."""
  if max_docs is not None and max_docs < 1:
    raise EvalError(f"--max_docs must be >= 1, got {max_docs}")
  if batch_size is not None and batch_size < 1:
    raise EvalError(f"--batch_size must be >= 1, got {batch_size}")
  records = read_documents(path, lang, max_docs)
  return evaluate_texts(saved_run.load_run(workdir, checkpoint, step, batch_size), group_by_lang(records))
