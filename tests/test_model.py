"""The Flax StableLM 2 against transformers' StableLmForCausalLM, causality, packing, parameter counts, scan and remat."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_testing import random_stablelm
import torch

from ar_lm_jax import hf
from ar_lm_jax.config import REMAT_POLICIES, ModelConfig
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


# ---------------------------------------------------------------------------
# Scan versus unrolled layers (the same parameters, stacked or not) and every remat policy versus none give the
# same loss and gradients; remat really lowers the step's memory.

REMAT_SMALL = ModelConfig(vocab_size=512, hidden_size=32, num_layers=3, num_heads=4, intermediate_size=64,
                          max_position_embeddings=64, dtype="float32")
REMAT_B, REMAT_T = 2, 32


def _remat_batch():
  rng = np.random.default_rng(0)
  seg = np.array([[1] * 10 + [2] * 22, [3] * 25 + [0] * 7], np.int32)
  pos = np.array([list(range(10)) + list(range(22)), list(range(25)) + [0] * 7], np.int32)
  return jnp.asarray(rng.integers(0, 512, (REMAT_B, REMAT_T)), jnp.int32), jnp.asarray(seg), jnp.asarray(pos)


def _loss_and_grads(cfg: ModelConfig, params):
  tokens, seg, pos = _remat_batch()

  def loss(params):
    logits = StableLM(cfg).apply({"params": params}, tokens, seg, pos)
    logp = jax.nn.log_softmax(logits[:, :-1])
    mask = (seg[:, :-1] != 0) & (seg[:, 1:] == seg[:, :-1])
    return -jnp.sum(jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0] * mask)

  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.fixture(scope="module")
def scanned():
  """Parameters of the scanned model and its loss and gradients (remat none): the reference."""
  @jax.jit
  def init(key):
    params = nn.meta.unbox(StableLM(REMAT_SMALL).init(key, jnp.zeros((1, 8), jnp.int32))["params"])
    # Perturb biases and norms away from 0/1 so that every parameter matters.
    return jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), params)

  params = init(jax.random.key(0))
  return params, _loss_and_grads(REMAT_SMALL, params)


def _unstack(params):
  out = {k: v for k, v in params.items() if k != "layers"}
  for i in range(REMAT_SMALL.num_layers):
    out[f"layers_{i}"] = jax.tree.map(lambda x: x[i], params["layers"])
  return out


def _assert_trees_close(got, want, rtol=1e-5, atol=1e-6):
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


def test_unrolled_equals_scanned_with_the_same_parameters(scanned):
  params, (want_loss, want_grads) = scanned
  loss, grads = _loss_and_grads(dataclasses.replace(REMAT_SMALL, scan_layers=False), _unstack(params))
  np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-6)
  _assert_trees_close(grads, _unstack(want_grads))


@pytest.mark.parametrize("policy", [p for p in REMAT_POLICIES if p != "none"])
def test_remat_policy_equals_no_remat(scanned, policy):
  params, (want_loss, want_grads) = scanned
  loss, grads = _loss_and_grads(dataclasses.replace(REMAT_SMALL, remat=policy), params)
  np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-6)
  _assert_trees_close(grads, want_grads)


def test_remat_unrolled_equals_no_remat(scanned):
  params, (want_loss, want_grads) = scanned
  loss, grads = _loss_and_grads(dataclasses.replace(REMAT_SMALL, scan_layers=False, remat="full"), _unstack(params))
  np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-6)
  _assert_trees_close(grads, _unstack(want_grads))


def test_full_remat_lowers_step_memory():
  """Remat is not a no-op: the compiled gradient's temporaries shrink (8 x 256 tokens, activations dominate)."""
  tokens = jnp.zeros((8, 256), jnp.int32)
  temps = {}
  for policy in ("none", "full"):
    cfg = dataclasses.replace(REMAT_SMALL, num_layers=4, max_position_embeddings=256, remat=policy)
    params = jax.eval_shape(lambda: nn.meta.unbox(StableLM(cfg).init(jax.random.key(0), tokens[:1, :8])["params"]))
    loss = lambda p: jnp.sum(StableLM(cfg).apply({"params": p}, tokens, return_hidden=True) ** 2)
    temps[policy] = jax.jit(jax.grad(loss)).lower(params).compile().memory_analysis().temp_size_in_bytes
  assert temps["full"] < 0.6 * temps["none"], temps
