"""The Hugging Face `StableLmForCausalLM` <-> ar_lm_jax weight mapping.

One table (`_LAYER_TABLE`) lists every per-layer tensor: our path, the HF name,
and how the torch `[out, in]` matrix is laid out in ours. Everything here works
on numpy arrays; torch and transformers are imported lazily, only by the
functions that read or write HF directories, so training never needs them.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping

import numpy as np

from ar_lm_jax.config import ModelConfig

HF_MODEL_TYPE = "stablelm"
HF_ARCHITECTURE = "StableLmForCausalLM"


class MappingError(ValueError):
  """Weights that do not fit the target config (names the tensor and both shapes)."""


# (our path inside a layer, HF name inside `model.layers.{i}.`, to_ours, to_hf)
# to_ours maps the HF tensor to ours given (D, N, H); to_hf is its inverse.
def _qkv_w(D, N, H):
  return (lambda w: w.T.reshape(D, N, H), lambda k: k.reshape(D, N * H).T)


def _qkv_b(D, N, H):
  return (lambda b: b.reshape(N, H), lambda b: b.reshape(N * H))


def _o_w(D, N, H):
  return (lambda w: w.T.reshape(N, H, D), lambda k: k.reshape(N * H, D).T)


def _t(D, N, H):
  return (lambda w: w.T, lambda k: k.T)


def _id(D, N, H):
  return (lambda x: x, lambda x: x)


def _layer_table(cfg: ModelConfig):
  rows = [
      (("input_layernorm", "scale"), "input_layernorm.weight", _id),
      (("post_attention_layernorm", "scale"), "post_attention_layernorm.weight", _id),
      (("self_attn", "q_proj", "kernel"), "self_attn.q_proj.weight", _qkv_w),
      (("self_attn", "k_proj", "kernel"), "self_attn.k_proj.weight", _qkv_w),
      (("self_attn", "v_proj", "kernel"), "self_attn.v_proj.weight", _qkv_w),
      (("self_attn", "o_proj", "kernel"), "self_attn.o_proj.weight", _o_w),
      (("mlp", "gate_proj", "kernel"), "mlp.gate_proj.weight", _t),
      (("mlp", "up_proj", "kernel"), "mlp.up_proj.weight", _t),
      (("mlp", "down_proj", "kernel"), "mlp.down_proj.weight", _t),
  ]
  if cfg.norm_bias:
    rows += [
        (("input_layernorm", "bias"), "input_layernorm.bias", _id),
        (("post_attention_layernorm", "bias"), "post_attention_layernorm.bias", _id),
    ]
  if cfg.qkv_bias:
    rows += [
        (("self_attn", "q_proj", "bias"), "self_attn.q_proj.bias", _qkv_b),
        (("self_attn", "k_proj", "bias"), "self_attn.k_proj.bias", _qkv_b),
        (("self_attn", "v_proj", "bias"), "self_attn.v_proj.bias", _qkv_b),
    ]
  return rows


_GLOBAL_TABLE = [
    (("embed_tokens", "embedding"), "model.embed_tokens.weight", _id),
    (("norm", "scale"), "model.norm.weight", _id),
    (("norm", "bias"), "model.norm.bias", _id),
    (("lm_head", "kernel"), "lm_head.weight", _t),
]


def _get(tree: Mapping, path: tuple) -> Any:
  for p in path:
    tree = tree[p]
  return tree


def _set(tree: dict, path: tuple, value: Any) -> None:
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def _dims(cfg: ModelConfig):
  return cfg.hidden_size, cfg.num_heads, cfg.head_dim


def hf_names(cfg: ModelConfig) -> list[str]:
  """Every HF tensor name the mapping produces, in a stable order."""
  names = [n for _, n, _ in _GLOBAL_TABLE]
  for i in range(cfg.num_layers):
    names += [f"model.layers.{i}.{n}" for _, n, _ in _layer_table(cfg)]
  return names


def params_to_hf(params: Mapping, cfg: ModelConfig, scan_layers: bool) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (HF name, numpy array) one tensor at a time, so a caller can stream them to disk."""
  dims = _dims(cfg)
  for path, name, fn in _GLOBAL_TABLE:
    yield name, np.asarray(fn(*dims)[1](np.asarray(_get(params, path))))
  for i in range(cfg.num_layers):
    for path, name, fn in _layer_table(cfg):
      if scan_layers:
        x = np.asarray(_get(params["layers"], path)[i])
      else:
        x = np.asarray(_get(params[f"layers_{i}"], path))
      yield f"model.layers.{i}.{name}", np.asarray(fn(*dims)[1](x))


def hf_to_params(get_tensor: Callable[[str], np.ndarray], cfg: ModelConfig, scan_layers: bool,
                 expected_shapes: Mapping | None = None) -> dict:
  """Builds our (unboxed) param tree from HF tensors fetched by name.

  `expected_shapes` (our path -> shape, e.g. from `jax.eval_shape`) turns a
  mismatch into a MappingError that names the tensor and both shapes.
  """
  dims = _dims(cfg)
  params: dict = {}

  def convert(name, path, fn):
    x = fn(*dims)[0](np.asarray(get_tensor(name)))
    return x

  def check(name, path, x):
    if expected_shapes is None:
      return
    want = tuple(_get(expected_shapes, path))
    if tuple(x.shape) != want:
      raise MappingError(f"{name}: checkpoint shape {tuple(x.shape)} does not match the config's {want} (at {'/'.join(path)})")

  for path, name, fn in _GLOBAL_TABLE:
    hf_shape = _expected_hf_shape(name, cfg)
    raw = np.asarray(get_tensor(name))
    if tuple(raw.shape) != hf_shape:
      raise MappingError(f"{name}: checkpoint shape {tuple(raw.shape)} does not match the config's {hf_shape}")
    x = fn(*dims)[0](raw)
    check(name, path, x)
    _set(params, path, x)
  layers = []
  for i in range(cfg.num_layers):
    layer: dict = {}
    for path, name, fn in _layer_table(cfg):
      full = f"model.layers.{i}.{name}"
      raw = np.asarray(get_tensor(full))
      hf_shape = _expected_hf_shape(name, cfg)
      if tuple(raw.shape) != hf_shape:
        raise MappingError(f"{full}: checkpoint shape {tuple(raw.shape)} does not match the config's {hf_shape}")
      _set(layer, path, fn(*dims)[0](raw))
    layers.append(layer)
  if scan_layers:
    import jax
    params["layers"] = jax.tree.map(lambda *xs: np.stack(xs), *layers)
  else:
    for i, layer in enumerate(layers):
      params[f"layers_{i}"] = layer
  return params


def _expected_hf_shape(name: str, cfg: ModelConfig) -> tuple:
  D, F, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
  leaf = name.split(".")
  if name in ("model.embed_tokens.weight", "lm_head.weight"):
    return (V, D)
  if name.startswith("model.norm") or "layernorm" in name:
    return (D,)
  if "_proj.bias" in name:
    return (D,)
  if leaf[-2] in ("q_proj", "k_proj", "v_proj", "o_proj"):
    return (D, D)
  if leaf[-2] in ("gate_proj", "up_proj"):
    return (F, D)
  if leaf[-2] == "down_proj":
    return (D, F)
  raise KeyError(name)


def hf_config_dict(cfg: ModelConfig, torch_dtype: str = "float32") -> dict:
  """A complete `config.json` for StableLmForCausalLM: every architecture field explicit."""
  from ar_lm_jax.tokenizer import EOS_ID
  if not cfg.norm_bias:
    raise MappingError("model.norm_bias=false has no StableLmForCausalLM equivalent (HF LayerNorms always have a bias)")
  return {
      "architectures": [HF_ARCHITECTURE],
      "model_type": HF_MODEL_TYPE,
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.intermediate_size,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_heads,
      "hidden_act": "silu",
      "max_position_embeddings": cfg.max_position_embeddings,
      "initializer_range": cfg.init_std,
      "layer_norm_eps": cfg.layer_norm_eps,
      "use_cache": True,
      "tie_word_embeddings": False,
      "rope_theta": cfg.rope_theta,
      "rope_scaling": None,
      "partial_rotary_factor": cfg.partial_rotary_factor,
      "use_qkv_bias": cfg.qkv_bias,
      "qk_layernorm": False,
      "use_parallel_residual": False,
      "hidden_dropout": 0.0,
      "attention_dropout": 0.0,
      "bos_token_id": EOS_ID,
      "eos_token_id": EOS_ID,
      "torch_dtype": torch_dtype,
  }


def model_config_from_hf(hf: Mapping, base: ModelConfig | None = None) -> ModelConfig:
  """Our ModelConfig for an HF StableLm config dict; refuses other model types."""
  import dataclasses
  if hf.get("model_type") != HF_MODEL_TYPE:
    raise MappingError(f"config.json: model_type is {hf.get('model_type')!r}, expected {HF_MODEL_TYPE!r} (StableLmForCausalLM)")
  for key, want in (("qk_layernorm", False), ("use_parallel_residual", False), ("tie_word_embeddings", False)):
    if bool(hf.get(key, False)) != want:
      raise MappingError(f"config.json: {key}={hf.get(key)} is not supported (StableLM 2 1.6B has {want})")
  if hf.get("num_key_value_heads", hf["num_attention_heads"]) != hf["num_attention_heads"]:
    raise MappingError("config.json: grouped KV heads (num_key_value_heads != num_attention_heads) are not supported")
  base = base or ModelConfig()
  return dataclasses.replace(
      base,
      vocab_size=hf["vocab_size"],
      hidden_size=hf["hidden_size"],
      num_layers=hf["num_hidden_layers"],
      num_heads=hf["num_attention_heads"],
      intermediate_size=hf["intermediate_size"],
      max_position_embeddings=hf["max_position_embeddings"],
      rope_theta=float(hf.get("rope_theta", 10000.0)),
      partial_rotary_factor=float(hf.get("partial_rotary_factor", 0.25)),
      layer_norm_eps=float(hf.get("layer_norm_eps", 1e-5)),
      qkv_bias=bool(hf.get("use_qkv_bias", False)),
      norm_bias=True,
  )
