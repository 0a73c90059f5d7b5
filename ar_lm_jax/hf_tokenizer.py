"""Export Arcade100k as a Hugging Face fast tokenizer (tokenizer.json + configs).

The result loads with `transformers.AutoTokenizer.from_pretrained(out_dir)` (no remote
code, no network) as a `PreTrainedTokenizerFast` that encodes text like our default
`Arcade100k.encode(text)`: a special-token string in text (`"<|endoftext|>"` scraped from
a web page) is plain text, never EOS, because tokenizer_config.json sets
`split_special_tokens`. That is how training data was tokenized, so scores and
continuations of the export match ours. Special ids are still what `eos_token_id` etc.
name and what decoding prints. The differences that remain:
  - `tokenizer(text, split_special_tokens=False)` matches `encode(text, allow_special=True)`
    (the original Arcade100k tokenizer's allowed_special="all"), for chat-style markup;
  - tokenizer.json read by the `tokenizers` library alone (`Tokenizer.from_file`) knows
    nothing of tokenizer_config.json and matches special-token strings in text, like
    allow_special=True (set `encode_special_tokens = True` on it for our behaviour).

The pipeline mirrors tiktoken:
  NFC normalizer -> Split(Arcade regex, isolated) -> ByteLevel(use_regex=False)
  -> BPE(ignore_merges=True) over the byte-level vocab, merges derived from the ranks.

`transformers` and `tokenizers` are imported lazily so the training stack does not
need them.
"""

from __future__ import annotations

import json
import os

from ar_lm_jax.tokenizer import (
    ARCADE100K_PATTERN, FIRST_SPECIAL_ID, SPECIAL_TOKENS, Arcade100k, TokenizerError)

MODEL_MAX_LENGTH = 4096


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible byte -> printable character map used by ByteLevel."""
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
               + list(range(ord("®"), ord("ÿ") + 1)))
  chars = list(printable)
  n = 0
  for b in range(256):
    if b not in printable:
      printable.append(b)
      chars.append(256 + n)
      n += 1
  return dict(zip(printable, map(chr, chars)))


def _split_for_rank(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
  """tiktoken's BPE on `token` using only merges ranked below `max_rank`.

  For a token of rank r this stops exactly one merge short of the token, leaving the
  two pieces whose merge created it, so each token contributes its one real merge.
  """
  parts = [token[i:i + 1] for i in range(len(token))]
  while len(parts) > 1:
    best_i, best_rank = -1, max_rank
    for i in range(len(parts) - 1):
      r = ranks.get(parts[i] + parts[i + 1])
      if r is not None and r < best_rank:
        best_i, best_rank = i, r
    if best_i < 0:
      break
    parts[best_i:best_i + 2] = [parts[best_i] + parts[best_i + 1]]
  return parts


def bpe_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
  """One merge per multi-byte token, in rank order (i.e. HF merge priority = tiktoken rank)."""
  merges = []
  for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
    if len(token) < 2:
      continue
    parts = _split_for_rank(ranks, token, rank)
    if len(parts) != 2:
      raise TokenizerError(
          f"ranks are not a BPE: token {token!r} (rank {rank}) is not the merge of two "
          f"lower-ranked tokens (got {len(parts)} pieces)")
    merges.append((parts[0], parts[1]))
  return merges


def build_tokenizer_json(tokenizer: Arcade100k) -> str:
  """The serialized `tokenizers.Tokenizer` (tokenizer.json contents)."""
  from tokenizers import (
      AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors)

  byte_map = _bytes_to_unicode()

  def to_str(b: bytes) -> str:
    return "".join(byte_map[x] for x in b)

  ranks = tokenizer.mergeable_ranks
  vocab = {to_str(tok): rank for tok, rank in ranks.items()}
  # tokenizers numbers added tokens from the model's vocab size (100256) unless the
  # model already knows them, and Arcade100k leaves 100256 empty, so the specials go
  # into the model vocab at their real ids. The added-token matcher runs before the
  # model, and the split regex never yields a whole special token as one pre-token,
  # so the model itself never emits them.
  special_ids = {tok: FIRST_SPECIAL_ID + i for i, tok in enumerate(SPECIAL_TOKENS)}
  vocab.update(special_ids)
  merges = [(to_str(a), to_str(b)) for a, b in bpe_merges(ranks)]
  # ignore_merges: tiktoken returns a pre-token that is itself in the vocab as one id
  # without running merges; HF must do the same or the two can disagree.
  hf = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, ignore_merges=True))
  hf.normalizer = normalizers.NFC()
  hf.pre_tokenizer = pre_tokenizers.Sequence([
      # The tiktoken pattern is used verbatim: Oniguruma (HF) and fancy-regex (tiktoken)
      # agree on it, incl. \p{N}, (?i:...) and \s+(?!\S); tests sweep the code points.
      pre_tokenizers.Split(Regex(ARCADE100K_PATTERN), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
  ])
  hf.decoder = decoders.ByteLevel()
  # A post-processor that adds nothing; without one transformers installs its own
  # template and may add BOS/EOS.
  hf.post_processor = processors.ByteLevel(trim_offsets=False)
  hf.add_special_tokens([
      AddedToken(tok, special=True, normalized=False, lstrip=False, rstrip=False, single_word=False)
      for tok in SPECIAL_TOKENS
  ])
  got = {tok: hf.token_to_id(tok) for tok in SPECIAL_TOKENS}
  if got != special_ids:
    raise TokenizerError(f"special token ids came out wrong in the HF export: {got}")
  return hf.to_str()


def save_hf_tokenizer(tokenizer: Arcade100k, out_dir: str) -> None:
  """Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json to out_dir."""
  os.makedirs(out_dir, exist_ok=True)
  eos = SPECIAL_TOKENS[0]
  with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
    f.write(build_tokenizer_json(tokenizer))

  added = {
      str(FIRST_SPECIAL_ID + i): {"content": tok, "lstrip": False, "normalized": False,
                                  "rstrip": False, "single_word": False, "special": True}
      for i, tok in enumerate(SPECIAL_TOKENS)
  }
  config = {
      "tokenizer_class": "PreTrainedTokenizerFast",
      "added_tokens_decoder": added,
      "additional_special_tokens": SPECIAL_TOKENS[1:],
      "bos_token": eos,
      "eos_token": eos,
      "pad_token": eos,
      "unk_token": eos,
      "model_max_length": MODEL_MAX_LENGTH,
      "clean_up_tokenization_spaces": False,
      "padding_side": "right",
      # Special-token strings in text are text, as in our tokenizer and so in the training data (module doc).
      "split_special_tokens": True,
  }
  special_map = {
      "bos_token": eos,
      "eos_token": eos,
      "pad_token": eos,
      "unk_token": eos,
      "additional_special_tokens": SPECIAL_TOKENS[1:],
  }
  for name, obj in (("tokenizer_config.json", config), ("special_tokens_map.json", special_map)):
    with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
      json.dump(obj, f, ensure_ascii=False, indent=2)
      f.write("\n")
