"""The Flax StableLM 2 against transformers' StableLmForCausalLM, causality, packing, parameter counts."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_testing import random_stablelm
import torch

from ar_lm_jax import hf
from ar_lm_jax.config import ModelConfig
from ar_lm_jax.model import StableLM, abstract_params, param_count

SMALL = ModelConfig(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=96,
                    max_position_embeddings=128, dtype="float32")


@pytest.fixture(scope="module")
def hf_model():
  return random_stablelm(SMALL)


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()


@pytest.mark.parametrize("scan_layers", [True, False])
def test_logits_match_transformers(hf_model, scan_layers):
  model, state = hf_model
  cfg = dataclasses.replace(SMALL, scan_layers=scan_layers)
  params = hf.hf_to_params(state.__getitem__, cfg, scan_layers)
  tokens = np.random.RandomState(1).randint(0, cfg.vocab_size, (3, 40))
  ours = np.asarray(jax.jit(StableLM(cfg).apply)({"params": params}, jnp.asarray(tokens)))
  ref = hf_logits(model, tokens)
  assert ours.shape == ref.shape
  assert np.abs(ours - ref).max() <= 1e-4
  assert np.abs(ref).max() > 0.1  # the comparison is not between two near-zero tensors


def test_packed_row_equals_each_document_alone(hf_model):
  model, state = hf_model
  params = hf.hf_to_params(state.__getitem__, SMALL, True)
  rs = np.random.RandomState(2)
  lengths = [17, 5, 30]
  docs = [rs.randint(0, SMALL.vocab_size, n) for n in lengths]
  pad = 8
  tokens = np.concatenate(docs + [np.zeros(pad, int)])[None]
  segments = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)] + [np.zeros(pad, int)])[None]
  positions = np.concatenate([np.arange(n) for n in lengths] + [np.arange(pad)])[None]
  logits = np.asarray(jax.jit(StableLM(SMALL).apply)({"params": params}, jnp.asarray(tokens), jnp.asarray(segments),
                                            jnp.asarray(positions)))
  start = 0
  for doc in docs:
    alone = hf_logits(model, doc[None])[0]
    assert np.abs(logits[0, start:start + len(doc)] - alone).max() <= 1e-4
    start += len(doc)


def test_causal_and_segment_isolation():
  """d logits[t] / d (embedding of the token at s) is non-zero iff s <= t in the same document."""
  model = StableLM(SMALL)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
  T = 24
  # Distinct token ids, so each embedding row feeds exactly one position.
  tokens = jnp.asarray(np.random.RandomState(3).choice(SMALL.vocab_size, T, replace=False)[None])
  segments = np.array([[1] * 10 + [2] * 14])
  positions = jnp.asarray(np.array([list(range(10)) + list(range(14))]))

  @jax.jit
  @jax.grad
  def grad_at(emb, t):
    p = {**params, "embed_tokens": {"embedding": emb}}
    return model.apply({"params": p}, tokens, jnp.asarray(segments), positions)[0, t].sum()

  for t in (3, 9, 10, 15, 23):
    g = grad_at(params["embed_tokens"]["embedding"], t)
    for s in range(T):
      row = float(jnp.abs(g[int(tokens[0, s])]).sum())
      visible = s <= t and segments[0, s] == segments[0, t]
      assert (row > 0) == visible, (t, s, row)


def test_later_tokens_do_not_change_earlier_logits():
  model = StableLM(SMALL)
  params = jax.jit(model.init)(jax.random.key(1), jnp.zeros((1, 8), jnp.int32))["params"]
  rs = np.random.RandomState(4)
  a = rs.randint(0, SMALL.vocab_size, (1, 20))
  b = a.copy()
  b[0, 12:] = rs.randint(0, SMALL.vocab_size, 8)
  apply = jax.jit(model.apply)
  la = np.asarray(apply({"params": params}, jnp.asarray(a)))
  lb = np.asarray(apply({"params": params}, jnp.asarray(b)))
  np.testing.assert_array_equal(la[0, :12], lb[0, :12])
  assert np.abs(la[0, 12:] - lb[0, 12:]).max() > 1e-3


def test_parameter_counts_of_presets():
  full = ModelConfig()
  assert param_count(abstract_params(full)) == 1_644_515_328  # HF StableLmForCausalLM with this config
  assert param_count(abstract_params(dataclasses.replace(full, norm_bias=False))) == 1_644_417_024  # the card
  from ar_lm_jax.config import load_config
  tiny = load_config("tiny").model
  assert tiny.vocab_size == 100352 and tiny.partial_rotary_factor == 0.25 and tiny.qkv_bias


def test_bf16_compute_close_to_fp32():
  cfg32 = SMALL
  cfg16 = dataclasses.replace(SMALL, dtype="bfloat16")
  params = jax.jit(StableLM(cfg32).init)(jax.random.key(2), jnp.zeros((1, 8), jnp.int32))["params"]
  tokens = jnp.asarray(np.random.RandomState(5).randint(0, SMALL.vocab_size, (2, 16)))
  l32 = jax.jit(StableLM(cfg32).apply)({"params": params}, tokens)
  l16 = jax.jit(StableLM(cfg16).apply)({"params": params}, tokens)
  assert l16.dtype == jnp.float32  # logits are returned in fp32 for the softmax
  assert float(jnp.abs(l32 - l16).max()) < 0.05 * float(jnp.abs(l32).max()) + 1e-2
