"""Autoregressive sampling with a KV cache: one jitted prefill + decode loop per call.

Prompts of different lengths are left-padded to a common length P (rounded up to
a bucket, so nearby lengths share one compilation). Padding has segment id 0 and
real tokens segment 1, so no real token ever attends to padding, and positions
count from each row's first real token: a row's result does not depend on what
else is in the batch. The prefill fills cache slots [0, P); the decode loop is a
`lax.while_loop` that feeds one token per row per iteration, so generating N
tokens compiles once, not N times, and stops as soon as every row has produced
EOS.

Greedy is `temperature=0`; otherwise logits are divided by the temperature, then
optionally cut to the `top_k` largest and to the smallest set whose probability
reaches `top_p` (nucleus), then sampled. Ids the tokenizer cannot decode (the
embedding's padding rows, cl100k's unused id 100256) are never generated.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ar_lm_jax.config import ModelConfig
from ar_lm_jax.errors import UserError
from ar_lm_jax.model import StableLM, lm_head_kernel, lm_logits
from ar_lm_jax.tokenizer import EOS_ID, N_MERGEABLE, N_VOCAB, load_tokenizer

PROMPT_BUCKET = 32  # prompt lengths are padded up to a multiple of this, so nearby lengths reuse a compilation


class GenerateError(UserError):
  """Bad generation input: an empty prompt, a sequence longer than the model allows, bad sampling settings."""


class Sampling(NamedTuple):
  """How the next token is drawn; hashable, so it is a static argument of the jitted loop."""
  temperature: float = 0.0  # 0: greedy (argmax)
  top_k: int = 0  # keep only the k most likely tokens; 0: all
  top_p: float = 1.0  # keep the smallest set of most likely tokens whose probability reaches p; 1: all

  def check(self) -> "Sampling":
    if self.temperature < 0:
      raise GenerateError(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise GenerateError(f"top_k must be >= 0, got {self.top_k}")
    if not 0 < self.top_p <= 1:
      raise GenerateError(f"top_p must be in (0, 1], got {self.top_p}")
    return self


GREEDY = Sampling()


def valid_token_mask(vocab_size: int) -> np.ndarray:
  """[V] bool: ids the tokenizer can decode. The embedding's padding rows and cl100k's unused id 100256 are not."""
  ok = np.arange(vocab_size) < N_VOCAB
  if vocab_size > N_MERGEABLE:
    ok[N_MERGEABLE] = False
  return ok


def sample_logits(logits_BV: jax.Array, rng: jax.Array, sampling: Sampling) -> jax.Array:
  """Next token ids [B] from fp32 logits (already -inf where a token is not allowed)."""
  if sampling.temperature == 0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = logits_BV / sampling.temperature
  neg_inf = jnp.array(-jnp.inf, logits_BV.dtype)
  if sampling.top_k > 0:
    kth_B1 = jax.lax.top_k(logits_BV, sampling.top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_B1, neg_inf, logits_BV)
  if sampling.top_p < 1:
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    # A token is kept when the mass strictly before it is below p, so the most likely token always is.
    before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    n_keep_B = jnp.sum(before_BV < sampling.top_p, axis=-1)
    threshold_B1 = jnp.take_along_axis(sorted_BV, n_keep_B[:, None] - 1, axis=-1)
    logits_BV = jnp.where(logits_BV < threshold_B1, neg_inf, logits_BV)
  return jax.random.categorical(rng, logits_BV, axis=-1).astype(jnp.int32)


def init_cache(cfg: ModelConfig, batch: int, max_len: int) -> dict:
  """An empty KV cache in the layout of the model's "cache" collection (see SelfAttention._attend_cached)."""
  N, H = cfg.num_heads, cfg.head_dim
  dt = jnp.dtype(cfg.dtype)

  def layer(*lead):
    return {"self_attn": {
        "key": jnp.zeros((*lead, batch, max_len, N, H), dt),
        "value": jnp.zeros((*lead, batch, max_len, N, H), dt),
        "segment_ids": jnp.zeros((*lead, batch, max_len), jnp.int32),
        "index": jnp.zeros(lead, jnp.int32),
    }}

  if cfg.scan_layers:
    return {"layers": layer(cfg.num_layers)}
  return {f"layers_{i}": layer() for i in range(cfg.num_layers)}


def left_pad(prompts: Sequence[Sequence[int]], bucket: int = PROMPT_BUCKET):
  """(tokens, segment_ids, positions) [B, P] with prompts right-aligned, and the prompt lengths [B]."""
  lengths = np.array([len(p) for p in prompts], np.int32)
  P = int(-(-lengths.max() // bucket) * bucket)
  tokens = np.zeros((len(prompts), P), np.int32)
  segments = np.zeros((len(prompts), P), np.int32)
  for b, p in enumerate(prompts):
    tokens[b, P - len(p):] = p
    segments[b, P - len(p):] = 1
  positions = np.maximum(np.arange(P, dtype=np.int32)[None] - (P - lengths)[:, None], 0)
  return tokens, segments, positions, lengths


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "sampling"))
def _generate(params, tokens_BP, segments_BP, positions_BP, lengths_B, valid_V, eos_id, rng, *,
              cfg: ModelConfig, max_new_tokens: int, sampling: Sampling):
  """[B, max_new_tokens] ids, EOS-filled after a row's first EOS, and the number of decode steps run."""
  model = StableLM(cfg)
  B, P = tokens_BP.shape
  head_DV = lm_head_kernel(params)

  def next_token(hidden_BD, rng):
    logits_BV = lm_logits(hidden_BD[:, None], head_DV, cfg.dtype)[:, 0]
    logits_BV = jnp.where(valid_V, logits_BV, -jnp.inf)
    return sample_logits(logits_BV, rng, sampling)

  hidden_BPD, variables = model.apply({"params": params, "cache": init_cache(cfg, B, P + max_new_tokens)},
                                      tokens_BP, segments_BP, positions_BP, return_hidden=True, mutable=["cache"])
  rng, sub = jax.random.split(rng)
  first_B = next_token(hidden_BPD[:, -1], sub)  # left padding puts every row's last prompt token at P-1
  out_BN = jnp.full((B, max_new_tokens), eos_id, jnp.int32).at[:, 0].set(first_B)

  def cond(carry):
    i, _, _, done_B, _, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done_B)

  def body(carry):
    i, cache, last_B, done_B, out_BN, rng = carry
    # Feeds token i-1, which sits at position length + i - 1 of its row and in cache slot P + i - 1.
    hidden_B1D, variables = model.apply({"params": params, "cache": cache}, last_B[:, None], jnp.ones((B, 1), jnp.int32),
                                        (lengths_B + i - 1)[:, None], return_hidden=True, mutable=["cache"])
    rng, sub = jax.random.split(rng)
    tok_B = jnp.where(done_B, eos_id, next_token(hidden_B1D[:, 0], sub))
    return i + 1, variables["cache"], tok_B, done_B | (tok_B == eos_id), out_BN.at[:, i].set(tok_B), rng

  carry = (jnp.int32(1), variables["cache"], first_B, first_B == eos_id, out_BN, rng)
  steps, _, _, _, out_BN, _ = jax.lax.while_loop(cond, body, carry)
  return out_BN, steps


def generate(params, cfg: ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             sampling: Sampling = GREEDY, rng: Optional[jax.Array] = None, eos_id: int = EOS_ID,
             valid_V: Optional[np.ndarray] = None) -> list[list[int]]:
  """Continues each prompt (a list of token ids) by up to `max_new_tokens` ids, stopping at EOS (not returned).

  `valid_V` ([vocab] bool, default `valid_token_mask`) says which ids may be generated.
  """
  sampling = sampling.check()
  if not prompts:
    raise GenerateError("no prompts")
  if any(len(p) == 0 for p in prompts):
    raise GenerateError("every prompt needs at least one token (no BOS is added)")
  if max_new_tokens < 1:
    raise GenerateError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  longest = max(len(p) for p in prompts) + max_new_tokens
  if longest > cfg.max_position_embeddings:
    raise GenerateError(f"prompt + max_new_tokens = {longest} tokens exceeds the model's "
                        f"max_position_embeddings={cfg.max_position_embeddings}")
  if sampling.top_k > cfg.vocab_size:
    raise GenerateError(f"top_k={sampling.top_k} exceeds the vocabulary ({cfg.vocab_size})")
  tokens, segments, positions, lengths = left_pad(prompts)
  valid_V = valid_token_mask(cfg.vocab_size) if valid_V is None else np.asarray(valid_V, bool)
  rng = jax.random.key(0) if rng is None else rng
  # The decode path never rematerializes: remat changes no parameter, only how a backward pass is computed.
  cfg = dataclasses.replace(cfg, remat="none")
  out_BN, _ = _generate(params, tokens, segments, positions, lengths, valid_V, jnp.int32(eos_id), rng,
                        cfg=cfg, max_new_tokens=max_new_tokens, sampling=sampling)
  results = []
  for row in np.asarray(out_BN).tolist():
    results.append(row[:row.index(eos_id)] if eos_id in row else row)
  return results


def generate_text(params, cfg: ModelConfig, prompts: Sequence[str], max_new_tokens: int, sampling: Sampling = GREEDY,
                  seed: int = 0, tokenizer_path: Optional[str] = None) -> list[dict]:
  """Text in, text out: {"prompt", "tokens" (the generated ids), "text" (their decoding)} per prompt."""
  tok = load_tokenizer(tokenizer_path)
  ids = generate(params, cfg, tok.encode_batch(list(prompts)), max_new_tokens, sampling, jax.random.key(seed))
  return [{"prompt": p, "tokens": x, "text": tok.decode(x)} for p, x in zip(prompts, ids)]


def generate_chat(params, cfg: ModelConfig, conversations: Sequence[Sequence[dict]], max_new_tokens: int,
                  sampling: Sampling = GREEDY, seed: int = 0, tokenizer_path: Optional[str] = None,
                  chat_template: str = "") -> list[dict]:
  """The assistant's next reply to each conversation: rendered with the chat template and its generation
  prompt (`chat.render`), decoded until <|im_end|> (not returned). {"tokens", "text"} per conversation."""
  from ar_lm_jax import chat  # pylint: disable=import-outside-toplevel
  tok = load_tokenizer(tokenizer_path)
  prompts = []
  for messages in conversations:
    try:
      ids, _ = chat.render(messages, chat_template, add_generation_prompt=True, tokenizer=tok)
    except chat.ChatError as e:
      raise GenerateError(f"conversation: {e}") from None
    prompts.append(ids.tolist())
  out = generate(params, cfg, prompts, max_new_tokens, sampling, jax.random.key(seed),
                 eos_id=tok.special_tokens[chat.IM_END])
  return [{"tokens": x, "text": tok.decode(x)} for x in out]
