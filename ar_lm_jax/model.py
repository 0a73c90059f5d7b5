"""StableLM 2 decoder in Flax (Linen), exactly as transformers' `StableLmForCausalLM`.

Shape letters: B batch, T tokens, S cache slots, D model, N heads, H head dim, R rotary dims, F MLP, V vocab.

Pre-LayerNorm blocks with a sequential residual, q/k/v biases only, NeoX
(rotate-half) rotary embeddings on the first `partial_rotary_factor` of each
head's dims, SwiGLU MLP, untied LM head.

Packed rows: `segment_ids` (0 = padding) keep attention inside one document and
`positions` restart at 0 for every document (gpt-neox `reset_attention_mask` /
`reset_position_ids`).

Every parameter carries logical axis names; `sharding.py` maps them to the mesh,
so this file knows nothing of devices. Parameter names mirror the Hugging Face
ones so that `hf.py` is a table of transposes.

Why Linen rather than NNX: the train state is a plain pytree of arrays that
optax, orbax and the HF mapping consume directly, and `nn.scan`/`nn.remat` with
logical partitioning metadata are mature there.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from ar_lm_jax.config import REMAT_POLICIES, ModelConfig
from ar_lm_jax import attention as attention_lib

Dtype = jnp.dtype


def _dtype(name: str) -> Dtype:
  return jnp.dtype(name)


def _param(module: nn.Module, name: str, init, shape, axes, cfg: ModelConfig):
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, _dtype(cfg.param_dtype))


def _weight(module: nn.Module, name: str, shape: tuple, axes: tuple):
  """A matrix (embedding, projection, LM head) drawn from N(0, init_std^2), as every one of them is."""
  return _param(module, name, nn.initializers.normal(module.cfg.init_std), shape, axes, module.cfg)


class LayerNorm(nn.Module):
  """LayerNorm computed in fp32 whatever the compute dtype, optional bias."""
  cfg: ModelConfig
  use_bias: bool = True

  @nn.compact
  def __call__(self, x_BTD):
    d = x_BTD.shape[-1]
    scale_D = _param(self, "scale", nn.initializers.ones, (d,), ("norm",), self.cfg)
    x = x_BTD.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + self.cfg.layer_norm_eps) * scale_D.astype(jnp.float32)[None, None, :]
    if self.use_bias:
      bias_D = _param(self, "bias", nn.initializers.zeros, (d,), ("norm",), self.cfg)
      y = y + bias_D.astype(jnp.float32)[None, None, :]
    return y.astype(_dtype(self.cfg.dtype))


def rotary_cos_sin(positions_BT: jax.Array, rotary_dim: int, theta: float):
  """cos/sin tables [B, T, rotary_dim] in fp32, NeoX layout (frequencies repeated, not interleaved)."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))
  freqs_BTR = positions_BT.astype(jnp.float32)[..., None] * inv_freq[None, None, :]
  emb = jnp.concatenate([freqs_BTR, freqs_BTR], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rotary(x_BTNH: jax.Array, cos_BTR: jax.Array, sin_BTR: jax.Array) -> jax.Array:
  """Rotate-half rotary on the first R dims of each head; the rest passes through."""
  r = cos_BTR.shape[-1]
  x_rot, x_pass = x_BTNH[..., :r].astype(jnp.float32), x_BTNH[..., r:]
  x1, x2 = x_rot[..., : r // 2], x_rot[..., r // 2:]
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  cos, sin = cos_BTR[:, :, None, :], sin_BTR[:, :, None, :]
  out = (x_rot * cos + rotated * sin).astype(x_BTNH.dtype)
  return jnp.concatenate([out, x_pass], axis=-1)


class _Proj(nn.Module):
  """x @ W (+ b) with W laid out [D, N, H] (q/k/v), [N, H, D] (o), [D, F] or [F, D] (MLP)."""
  cfg: ModelConfig
  _: dataclasses.KW_ONLY  # the rest by name only: tuples given by position could be swapped and still trace
  shape: tuple
  axes: tuple  # logical axis names of W, one per dim of `shape`
  eq: str  # the einsum of x and W
  use_bias: bool = False
  bias_shape: tuple = ()
  bias_axes: tuple = ()

  @nn.compact
  def __call__(self, x):
    dt = _dtype(self.cfg.dtype)
    w = _weight(self, "kernel", self.shape, self.axes)
    y = jnp.einsum(self.eq, x.astype(dt), w.astype(dt))
    if self.use_bias:
      b = _param(self, "bias", nn.initializers.zeros, self.bias_shape, self.bias_axes, self.cfg)
      y = y + b.astype(dt)[None, None]  # the bias is y's trailing dims, after [B, T]
    return y


class Embed(nn.Module):
  """Token ids [B, T] -> their rows of the [V, D] embedding, in the compute dtype."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BT):
    embedding_VD = _weight(self, "embedding", (self.cfg.vocab_size, self.cfg.hidden_size), ("vocab", "embed"))
    return jnp.take(embedding_VD, tokens_BT, axis=0).astype(_dtype(self.cfg.dtype))


def lm_logits(x_BTD: jax.Array, head_DV: jax.Array, dtype: str,
              logical_axes: tuple = ("batch", "length", "act_vocab")) -> jax.Array:
  """LM-head matmul on compute-dtype operands that accumulates and outputs fp32 logits.

  The logits feed an fp32 softmax: rounding them to bf16 first (output in the compute
  dtype, cast afterwards) costs up to ~0.1 nats per token at logits of magnitude ~16.
  Any leading axes (the chunked loss passes [G, B/G, C, D]), named by `logical_axes`.
  """
  dt = _dtype(dtype)
  logits_BTV = jnp.einsum("...d,dv->...v", x_BTD.astype(dt), head_DV.astype(dt), preferred_element_type=jnp.float32)
  return nn.with_logical_constraint(logits_BTV, logical_axes)


class LMHead(nn.Module):
  """Hidden states [..., D] -> fp32 logits [..., V] through the untied [D, V] kernel."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD):
    kernel_DV = _weight(self, "kernel", (self.cfg.hidden_size, self.cfg.vocab_size), ("embed", "vocab"))
    return lm_logits(x_BTD, kernel_DV, self.cfg.dtype)


def lm_head_kernel(params) -> jax.Array:
  """The LM head's [D, V] kernel in a params tree, for the callers that apply it outside the model: the
  chunked loss, the harness at its scored positions, and decoding one position at a time."""
  return params["lm_head"]["kernel"]


class SelfAttention(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD, segment_ids_BT, positions_BT):
    cfg = self.cfg
    D, N, H = cfg.hidden_size, cfg.num_heads, cfg.head_dim

    def qkv(name):
      return _Proj(cfg, shape=(D, N, H), axes=("embed", "heads", "head_dim"), eq="btd,dnh->btnh", use_bias=cfg.qkv_bias,
                   bias_shape=(N, H), bias_axes=("heads", "head_dim"), name=name)(x_BTD)

    q_BTNH, k_BTNH, v_BTNH = qkv("q_proj"), qkv("k_proj"), qkv("v_proj")
    cos, sin = rotary_cos_sin(positions_BT, cfg.rotary_dim, cfg.rope_theta)
    q_BTNH = apply_rotary(q_BTNH, cos, sin)
    k_BTNH = apply_rotary(k_BTNH, cos, sin)
    q_BTNH = nn.with_logical_constraint(q_BTNH, ("batch", "length", "act_heads", "head_dim"))
    k_BTNH = nn.with_logical_constraint(k_BTNH, ("batch", "length", "act_heads", "head_dim"))
    v_BTNH = nn.with_logical_constraint(v_BTNH, ("batch", "length", "act_heads", "head_dim"))
    if self.has_variable("cache", "key"):  # only generate.py passes a KV cache; training never takes this branch
      out_BTNH = self._attend_cached(q_BTNH, k_BTNH, v_BTNH, segment_ids_BT)
    else:
      # The kernels hold no parameters, and init traces a [1, 8] batch that splash cannot tile: init takes the reference.
      attn_cfg = dataclasses.replace(cfg, attention="xla") if self.is_initializing() else cfg
      out_BTNH = attention_lib.attend(q_BTNH, k_BTNH, v_BTNH, segment_ids_BT, attn_cfg)
    out_BTNH = checkpoint_name(out_BTNH, "attn_out")
    return _Proj(cfg, shape=(N, H, D), axes=("heads", "head_dim", "embed"), eq="btnh,nhd->btd", name="o_proj")(out_BTNH)

  def _attend_cached(self, q_BTNH, k_BTNH, v_BTNH, segment_ids_BT):
    """Decoding: writes this call's keys/values at cache slot `index`, then attends over the whole cache.

    Query t sits in slot index+t and sees slot s iff s <= index+t and s holds the same segment: slots not
    yet written are excluded by causality, left-padding (segment 0) by the segment test.
    """
    index = self.get_variable("cache", "index")
    cache_k_BSNH = self.get_variable("cache", "key")
    cache_k_BSNH = jax.lax.dynamic_update_slice(cache_k_BSNH, k_BTNH.astype(cache_k_BSNH.dtype), (0, index, 0, 0))
    cache_v_BSNH = self.get_variable("cache", "value")
    cache_v_BSNH = jax.lax.dynamic_update_slice(cache_v_BSNH, v_BTNH.astype(cache_v_BSNH.dtype), (0, index, 0, 0))
    cache_seg_BS = jax.lax.dynamic_update_slice(self.get_variable("cache", "segment_ids"), segment_ids_BT, (0, index))
    T, S = q_BTNH.shape[1], cache_k_BSNH.shape[1]
    causal_TS = jnp.arange(S)[None, :] <= index + jnp.arange(T)[:, None]
    mask_BTS = causal_TS[None] & (segment_ids_BT[:, :, None] == cache_seg_BS[:, None, :])
    out_BTNH = jax.nn.dot_product_attention(q_BTNH, cache_k_BSNH, cache_v_BSNH, mask=mask_BTS[:, None], implementation="xla")
    self.put_variable("cache", "key", cache_k_BSNH)
    self.put_variable("cache", "value", cache_v_BSNH)
    self.put_variable("cache", "segment_ids", cache_seg_BS)
    self.put_variable("cache", "index", index + T)
    return out_BTNH


class MLP(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD):
    cfg = self.cfg
    D, F = cfg.hidden_size, cfg.intermediate_size
    gate_BTF = _Proj(cfg, shape=(D, F), axes=("embed", "mlp"), eq="btd,df->btf", name="gate_proj")(x_BTD)
    up_BTF = _Proj(cfg, shape=(D, F), axes=("embed", "mlp"), eq="btd,df->btf", name="up_proj")(x_BTD)
    h_BTF = nn.silu(gate_BTF) * up_BTF
    h_BTF = nn.with_logical_constraint(h_BTF, ("batch", "length", "act_mlp"))
    out_BTD = _Proj(cfg, shape=(F, D), axes=("mlp", "embed"), eq="btf,fd->btd", name="down_proj")(h_BTF)
    return checkpoint_name(out_BTD, "mlp_out")


class Block(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD, segment_ids_BT, positions_BT):
    cfg = self.cfg
    h = LayerNorm(cfg, cfg.norm_bias, name="input_layernorm")(x_BTD)
    x_BTD = x_BTD + SelfAttention(cfg, name="self_attn")(h, segment_ids_BT, positions_BT)
    h = LayerNorm(cfg, cfg.norm_bias, name="post_attention_layernorm")(x_BTD)
    x_BTD = x_BTD + MLP(cfg, name="mlp")(h)
    return nn.with_logical_constraint(x_BTD, ("batch", "length", "act_embed"))


class _ScanBlock(Block):
  """Block with the (carry, _) signature nn.scan wants."""

  def __call__(self, x_BTD, segment_ids_BT, positions_BT):
    return super().__call__(x_BTD, segment_ids_BT, positions_BT), None


def remat_policy(name: str):
  """The jax.checkpoint policy `config.REMAT_POLICIES[name]` describes; `None` means no rematerialization."""
  spec = REMAT_POLICIES[name]
  if spec is None:
    return None
  if isinstance(spec, str):
    return getattr(jax.checkpoint_policies, spec)
  return jax.checkpoint_policies.save_only_these_names(*spec)  # tags set by checkpoint_name in the layers


class StableLM(nn.Module):
  """Returns fp32 logits [B, T, V], or the final hidden states when `return_hidden`."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BT, segment_ids_BT=None, positions_BT=None, return_hidden: bool = False):
    cfg = self.cfg
    B, T = tokens_BT.shape
    if segment_ids_BT is None:
      segment_ids_BT = jnp.ones((B, T), jnp.int32)
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))

    x_BTD = Embed(cfg, name="embed_tokens")(tokens_BT)
    x_BTD = nn.with_logical_constraint(x_BTD, ("batch", "length", "act_embed"))

    policy = remat_policy(cfg.remat)
    if cfg.scan_layers:
      block = _ScanBlock
      if cfg.remat != "none":
        block = nn.remat(block, policy=policy, prevent_cse=False)
      x_BTD, _ = nn.scan(
          block,
          variable_axes={"params": 0, "cache": 0},  # "cache": the per-layer KV cache of generate.py
          split_rngs={"params": True},
          in_axes=(nn.broadcast, nn.broadcast),
          length=cfg.num_layers,
          metadata_params={nn.PARTITION_NAME: "layers"},
      )(cfg, name="layers")(x_BTD, segment_ids_BT, positions_BT)
    else:
      block = Block
      if cfg.remat != "none":
        block = nn.remat(block, policy=policy)
      for i in range(cfg.num_layers):
        x_BTD = block(cfg, name=f"layers_{i}")(x_BTD, segment_ids_BT, positions_BT)

    x_BTD = LayerNorm(cfg, True, name="norm")(x_BTD)
    if return_hidden:
      return x_BTD
    return LMHead(cfg, name="lm_head")(x_BTD)


def param_count(params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))


def abstract_params(cfg: ModelConfig, batch: int = 1, seq: int = 8):
  """Boxed (logically partitioned) parameter shapes, without allocating anything."""
  model = StableLM(cfg)
  tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
  return jax.eval_shape(functools.partial(model.init, return_hidden=False), jax.random.key(0), tokens)["params"]
