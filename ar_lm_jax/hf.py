"""The Hugging Face `StableLmForCausalLM` <-> ar_lm_jax weight mapping.

`leaves(cfg, scan_layers)` is the one table: every leaf of our parameter tree,
the HF tensor(s) it holds (one per layer when the layers are stacked for
nn.scan), the HF shape, and the two layout transforms between a torch `[out, in]`
matrix and ours. Everything here works on numpy arrays, one leaf at a time, so
a converter can stream a model without holding two copies of it. Directory I/O
(safetensors, orbax) lives in `hf_io.py`; nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from ar_lm_jax.config import ConfigError, ModelConfig

HF_MODEL_TYPE = "stablelm"
HF_ARCHITECTURE = "StableLmForCausalLM"
# Buffers older transformers versions saved with the weights; recomputed from the config, never needed.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


class MappingError(ConfigError):
  """Weights or a config.json that do not fit the target config (names the tensor and both shapes).

  A ConfigError, so every command-line face reports it as bad input (exit 2).
  """


@dataclasses.dataclass(frozen=True)
class Leaf:
  path: tuple[str, ...]  # our path inside the params tree
  hf_names: tuple[str, ...]  # the HF tensors this leaf holds: one per layer when stacked, else one
  hf_shape: tuple[int, ...]  # shape of each of those HF tensors
  to_ours: Callable[[np.ndarray], np.ndarray]  # one HF tensor -> our layout (one layer's slice)
  to_hf: Callable[[np.ndarray], np.ndarray]  # inverse of to_ours
  stacked: bool  # our array has a leading layer axis over hf_names


def _transforms(kind: str, D: int, N: int, H: int):
  """(to_ours, to_hf) for one kind of tensor; torch Linear weights are [out, in]."""
  if kind == "qkv_w":  # [N*H, D] <-> [D, N, H]
    return lambda w: w.T.reshape(D, N, H), lambda k: k.reshape(D, N * H).T
  if kind == "qkv_b":  # [N*H] <-> [N, H]
    return lambda b: b.reshape(N, H), lambda b: b.reshape(N * H)
  if kind == "o_w":  # [D, N*H] <-> [N, H, D]
    return lambda w: w.T.reshape(N, H, D), lambda k: k.reshape(N * H, D).T
  if kind == "t":  # [out, in] <-> [in, out]
    return lambda w: w.T, lambda k: k.T
  return lambda x: x, lambda x: x


def _layer_rows(cfg: ModelConfig) -> list[tuple[tuple[str, ...], str, str, tuple[int, ...]]]:
  """(our path inside a block, HF name inside `model.layers.{i}.`, transform kind, HF shape)."""
  D, F = cfg.hidden_size, cfg.intermediate_size
  rows = [
      (("input_layernorm", "scale"), "input_layernorm.weight", "id", (D,)),
      (("post_attention_layernorm", "scale"), "post_attention_layernorm.weight", "id", (D,)),
      (("self_attn", "q_proj", "kernel"), "self_attn.q_proj.weight", "qkv_w", (D, D)),
      (("self_attn", "k_proj", "kernel"), "self_attn.k_proj.weight", "qkv_w", (D, D)),
      (("self_attn", "v_proj", "kernel"), "self_attn.v_proj.weight", "qkv_w", (D, D)),
      (("self_attn", "o_proj", "kernel"), "self_attn.o_proj.weight", "o_w", (D, D)),
      (("mlp", "gate_proj", "kernel"), "mlp.gate_proj.weight", "t", (F, D)),
      (("mlp", "up_proj", "kernel"), "mlp.up_proj.weight", "t", (F, D)),
      (("mlp", "down_proj", "kernel"), "mlp.down_proj.weight", "t", (D, F)),
  ]
  if cfg.norm_bias:
    rows += [
        (("input_layernorm", "bias"), "input_layernorm.bias", "id", (D,)),
        (("post_attention_layernorm", "bias"), "post_attention_layernorm.bias", "id", (D,)),
    ]
  if cfg.qkv_bias:
    rows += [(("self_attn", f"{p}_proj", "bias"), f"self_attn.{p}_proj.bias", "qkv_b", (D,)) for p in "qkv"]
  return rows


def leaves(cfg: ModelConfig, scan_layers: bool) -> list[Leaf]:
  """Every leaf of our parameter tree with the HF tensors it maps to, in a stable order."""
  D, N, H, V = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.vocab_size
  out = [
      Leaf(("embed_tokens", "embedding"), ("model.embed_tokens.weight",), (V, D), *_transforms("id", D, N, H), False),
      Leaf(("norm", "scale"), ("model.norm.weight",), (D,), *_transforms("id", D, N, H), False),
      Leaf(("norm", "bias"), ("model.norm.bias",), (D,), *_transforms("id", D, N, H), False),
      Leaf(("lm_head", "kernel"), ("lm_head.weight",), (V, D), *_transforms("t", D, N, H), False),
  ]
  L = cfg.num_layers
  for path, name, kind, shape in _layer_rows(cfg):
    fns = _transforms(kind, D, N, H)
    if scan_layers:
      out.append(Leaf(("layers", *path), tuple(f"model.layers.{i}.{name}" for i in range(L)), shape, *fns, True))
    else:
      out += [Leaf((f"layers_{i}", *path), (f"model.layers.{i}.{name}",), shape, *fns, False) for i in range(L)]
  return out


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """HF tensor name -> shape, for every tensor of the model."""
  return {name: leaf.hf_shape for leaf in leaves(cfg, False) for name in leaf.hf_names}


def hf_names(cfg: ModelConfig) -> list[str]:
  """Every HF tensor name the mapping produces, in a stable order."""
  return list(hf_shapes(cfg))


def check_hf_shapes(found: Mapping[str, tuple], cfg: ModelConfig) -> None:
  """Raises MappingError for a missing, unexpected or mis-shaped HF tensor, before any data is read."""
  want = hf_shapes(cfg)
  for name, shape in want.items():
    if name not in found:
      raise MappingError(f"{name}: missing from the checkpoint (the config expects shape {shape})")
    if tuple(found[name]) != shape:
      raise MappingError(f"{name}: checkpoint shape {tuple(found[name])} does not match the config's {shape}")
  extra = sorted(n for n in found if n not in want and not n.endswith(_IGNORED_SUFFIXES))
  if extra:
    raise MappingError(f"{extra[0]}: unexpected tensor {tuple(found[extra[0]])} that the config has no place for "
                       f"({len(extra)} unexpected in all)")


def leaf_from_hf(leaf: Leaf, get_tensor: Callable[[str], np.ndarray], dtype: Any = np.float32) -> np.ndarray:
  """Our array for `leaf`, reading its HF tensor(s) by name; checks every shape."""
  out = None
  for i, name in enumerate(leaf.hf_names):
    raw = np.asarray(get_tensor(name))
    if tuple(raw.shape) != leaf.hf_shape:
      raise MappingError(f"{name}: checkpoint shape {tuple(raw.shape)} does not match the config's {leaf.hf_shape}")
    x = np.asarray(leaf.to_ours(raw), dtype=dtype)
    if not leaf.stacked:
      return x
    if out is None:  # filled in place: a stacked leaf never exists twice
      out = np.empty((len(leaf.hf_names), *x.shape), dtype)
    out[i] = x
  return out


def leaf_to_hf(leaf: Leaf, x: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
  """(HF name, contiguous HF array) for each tensor `leaf` holds."""
  x = np.asarray(x)
  for i, name in enumerate(leaf.hf_names):
    y = np.ascontiguousarray(leaf.to_hf(x[i] if leaf.stacked else x))
    if y.shape != leaf.hf_shape:
      raise MappingError(f"{name}: our array gives shape {y.shape}, the config expects {leaf.hf_shape}")
    yield name, y


def get_path(tree: Mapping, path: tuple) -> Any:
  """The leaf of a nested dict at `path` (a leaf's path in `leaves`); `set_path` writes one."""
  for p in path:
    tree = tree[p]
  return tree


def set_path(tree: dict, path: tuple, value: Any) -> None:
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def params_to_hf(params: Mapping, cfg: ModelConfig, scan_layers: bool) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (HF name, numpy array) one tensor at a time, so a caller can stream them to disk."""
  for leaf in leaves(cfg, scan_layers):
    yield from leaf_to_hf(leaf, np.asarray(get_path(params, leaf.path)))


def hf_to_params(get_tensor: Callable[[str], np.ndarray], cfg: ModelConfig, scan_layers: bool,
                 expected_shapes: Mapping | None = None) -> dict:
  """Builds our (unboxed) param tree, in `cfg.param_dtype`, from HF tensors fetched by name.

  `expected_shapes` (a tree of shapes or ShapeDtypeStructs, e.g. from
  `jax.eval_shape`) additionally checks our side of the mapping.
  """
  import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)
  params: dict = {}
  for leaf in leaves(cfg, scan_layers):
    x = leaf_from_hf(leaf, get_tensor, np.dtype(cfg.param_dtype))
    if expected_shapes is not None:
      want = tuple(getattr(get_path(expected_shapes, leaf.path), "shape", get_path(expected_shapes, leaf.path)))
      if x.shape != want:
        raise MappingError(f"{'/'.join(leaf.path)}: mapped shape {x.shape} does not match the model's {want}")
    set_path(params, leaf.path, x)
  return params


def hf_config_dict(cfg: ModelConfig, torch_dtype: str = "float32") -> dict:
  """A complete `config.json` for StableLmForCausalLM: every architecture field explicit.

  The rotary settings are written twice: in `rope_parameters` (transformers >= 5,
  where a missing `partial_rotary_factor` would silently rotate every dim) and as
  the top-level keys older versions read.
  """
  from ar_lm_jax.tokenizer import EOS_ID
  if not cfg.norm_bias:
    raise MappingError("model.norm_bias=false has no StableLmForCausalLM equivalent (HF LayerNorms always have a bias)")
  eos = EOS_ID if cfg.vocab_size > EOS_ID else None  # a toy vocab has no row for it
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
      "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta,
                          "partial_rotary_factor": cfg.partial_rotary_factor},
      "rope_theta": cfg.rope_theta,
      "partial_rotary_factor": cfg.partial_rotary_factor,
      "rope_scaling": None,
      "use_qkv_bias": cfg.qkv_bias,
      "qk_layernorm": False,
      "use_parallel_residual": False,
      "hidden_dropout": 0.0,
      "attention_dropout": 0.0,
      "bos_token_id": eos,
      "eos_token_id": eos,
      # HF passes pad_token_id to nn.Embedding as padding_idx, which would freeze the gradient
      # of the <|endoftext|> row (our document separator) in any PyTorch fine-tune.
      "pad_token_id": None,
      "dtype": torch_dtype,
      "torch_dtype": torch_dtype,
  }


def generation_config_dict() -> dict:
  """generation_config.json: greedy by default, padding finished sequences with <|endoftext|>."""
  from ar_lm_jax.tokenizer import EOS_ID
  return {"bos_token_id": EOS_ID, "eos_token_id": EOS_ID, "pad_token_id": EOS_ID, "do_sample": False}


# StableLmConfig's own defaults, applied where a config.json omits a key (as transformers does).
_HF_DEFAULTS = {"hidden_act": "silu", "layer_norm_eps": 1e-5, "use_qkv_bias": False, "qk_layernorm": False,
                "use_parallel_residual": False, "tie_word_embeddings": False, "num_key_value_heads": 32,
                "rope_theta": 10000.0, "partial_rotary_factor": 0.25}
_HF_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "max_position_embeddings")


def _rope(hf: Mapping) -> tuple[float, float]:
  """(rope_theta, partial_rotary_factor) from either config layout; only plain rotary is supported."""
  rope = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling") or {}
  kind = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
  if kind != "default":
    raise MappingError(f"config.json: rope_type {kind!r} is not supported (StableLM 2 uses plain rotary)")
  theta = rope.get("rope_theta", hf.get("rope_theta", _HF_DEFAULTS["rope_theta"]))
  factor = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", _HF_DEFAULTS["partial_rotary_factor"]))
  return float(theta), float(factor)


def model_config_from_hf(hf: Mapping, base: ModelConfig | None = None) -> ModelConfig:
  """Our ModelConfig for an HF StableLm config dict (non-architecture fields from `base`); refuses other models."""
  if "model_type" not in hf:
    raise MappingError("config.json: no model_type, so not a Hugging Face model config")
  if hf.get("model_type") != HF_MODEL_TYPE:
    raise MappingError(f"config.json: model_type is {hf.get('model_type')!r}, expected {HF_MODEL_TYPE!r} "
                       f"({HF_ARCHITECTURE}); this converter handles StableLM 2 models only")
  missing = [k for k in _HF_REQUIRED if k not in hf]
  if missing:
    raise MappingError(f"config.json: missing {', '.join(missing)}")
  get = lambda k: hf[k] if k in hf else _HF_DEFAULTS[k]
  for key, want in (("qk_layernorm", False), ("use_parallel_residual", False), ("tie_word_embeddings", False),
                    ("hidden_act", "silu")):
    if get(key) != want:
      raise MappingError(f"config.json: {key}={get(key)!r} is not supported (StableLM 2 1.6B has {want!r})")
  if get("num_key_value_heads") != hf["num_attention_heads"]:
    raise MappingError(f"config.json: num_key_value_heads={get('num_key_value_heads')} differs from "
                       f"num_attention_heads={hf['num_attention_heads']}; grouped KV heads are not supported")
  theta, factor = _rope(hf)
  base = base or ModelConfig()
  return dataclasses.replace(
      base,
      vocab_size=hf["vocab_size"],
      hidden_size=hf["hidden_size"],
      num_layers=hf["num_hidden_layers"],
      num_heads=hf["num_attention_heads"],
      intermediate_size=hf["intermediate_size"],
      max_position_embeddings=hf["max_position_embeddings"],
      rope_theta=theta,
      partial_rotary_factor=factor,
      layer_norm_eps=float(get("layer_norm_eps")),
      qkv_bias=bool(get("use_qkv_bias")),
      norm_bias=True,
  )


ARCH_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size", "rope_theta",
               "partial_rotary_factor", "layer_norm_eps", "qkv_bias", "norm_bias")


def check_same_architecture(target: ModelConfig, source: ModelConfig, source_name: str = "the Hugging Face config.json") -> None:
  """Raises MappingError naming the first architecture field where the weights' source and our config disagree."""
  for f in ARCH_FIELDS:
    a, b = getattr(target, f), getattr(source, f)
    if a != b:
      raise MappingError(f"model.{f}: the config has {a!r} but {source_name} has {b!r}")
