"""Hugging Face directories <-> our parameters and orbax checkpoints, one tensor at a time.

Reading: `config.json` plus `model.safetensors` (single or sharded with its index)
or `pytorch_model.bin` (single or sharded). Tensor shapes are checked from the
file headers before any data is read, then each of our leaves is built from its
HF tensors and, for training, placed straight into its NamedSharding, so the full
model never sits on one device or twice in host memory.

Writing: `config.json`, `generation_config.json`, sharded safetensors with their
index, and (for whole exports) the Arcade100k fast tokenizer. Shards are flushed
as they fill, and the checkpoint is read a group of leaves at a time, so an
export holds at most a GiB of restored leaves plus one shard (3.6 GB peak RSS
for the 1.6B model, whose fp32 weights are 6.6 GB).

A converted-from-HF checkpoint is a workdir (`config.json` + `checkpoints/0/`)
whose step-0 state holds `step` and `params` only, no optimizer state: start a
run from it with `--config.checkpoint.init_from=DIR` (a fresh step-0 run with a
fresh optimizer) or evaluate it like any checkpoint.

Our checkpoints are read through `saved_run` (every params read verified against
its fingerprints) and written by `checkpoint.Checkpointer`; this module knows
only the Hugging Face side. safetensors, torch and orbax are imported inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional

import numpy as np

from ar_lm_jax import hf
from ar_lm_jax.config import Config, ConfigError, DataConfig, ModelConfig, dumps, from_dict

SAFE_SINGLE, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
# Our full run config, saved next to an export so that importing it back gives the same run (seq_len, tokenizer).
RUN_CONFIG = "ar_lm_jax_config.json"
BIN_SINGLE, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
EXPORT_DTYPES = ("float32", "bfloat16")
DEFAULT_MAX_SHARD_BYTES = 2 << 30
# Files an export writes; --overwrite removes only these, never anything else in the directory.
_HF_OUTPUTS = ("config.json", "generation_config.json", "model*.safetensors", SAFE_INDEX, "pytorch_model*.bin",
               BIN_INDEX, "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", RUN_CONFIG)


class ConversionError(ConfigError):
  """A path a conversion cannot use: not an HF model directory, an unreadable weights file, a non-empty output."""


def _np_dtype(name: str) -> np.dtype:
  import ml_dtypes  # registers bfloat16 with numpy
  return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


# ---------------------------------------------------------------------------
# Reading Hugging Face directories.


def read_hf_config(hf_dir: str | os.PathLike) -> dict:
  path = Path(hf_dir) / "config.json"
  if not Path(hf_dir).is_dir():
    raise ConversionError(f"{hf_dir}: not a directory")
  if not path.is_file():
    raise ConversionError(f"{hf_dir}: no config.json (not a Hugging Face model directory)")
  try:
    cfg = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ConversionError(f"{path}: not valid JSON: {e}") from None
  if not isinstance(cfg, dict):
    raise ConversionError(f"{path}: expected a JSON object")
  if "model_type" not in cfg and {"model", "train", "checkpoint"} <= set(cfg):
    raise ConversionError(f"{hf_dir}: is a workdir of ours (its config.json is a run config), not a Hugging Face "
                          "model; export it with tools.convert_to_pytorch, or start a run from it with "
                          "--config.checkpoint.init_from")
  return cfg


class HFWeights:
  """Lazy access to the tensors of an HF directory: shapes from the headers, data by name on demand."""

  def __init__(self, hf_dir: str | os.PathLike):
    d = Path(hf_dir)
    self._files: dict[str, Path] = {}  # tensor name -> file
    self._open: dict[Path, Any] = {}
    if (d / SAFE_INDEX).is_file() or (d / SAFE_SINGLE).is_file():
      self.kind = "safetensors"
    elif (d / BIN_INDEX).is_file() or (d / BIN_SINGLE).is_file():
      self.kind = "bin"
    else:
      raise ConversionError(f"{hf_dir}: no {SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} or {BIN_INDEX}")
    index = d / (SAFE_INDEX if self.kind == "safetensors" else BIN_INDEX)
    if index.is_file():
      try:
        weight_map = json.loads(index.read_text())["weight_map"]
        self._files = {name: d / f for name, f in weight_map.items()}
      except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ConversionError(f"{index}: not a weight index ({type(e).__name__}: {e})") from None
    else:
      single = d / (SAFE_SINGLE if self.kind == "safetensors" else BIN_SINGLE)
      self._files = {name: single for name in self._handle(single).keys()}
    self.shapes = {name: self._shape(name) for name in self._files}

  def _handle(self, path: Path):
    if path not in self._open:
      if not path.is_file():
        raise ConversionError(f"{path}: listed in the index but missing")
      try:
        if self.kind == "safetensors":
          from safetensors import safe_open
          _np_dtype("bfloat16")
          self._open[path] = safe_open(str(path), framework="numpy")
        else:
          import torch
          # mmap: tensors are paged in when read, so a sharded .bin never sits in memory whole.
          self._open[path] = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
      except Exception as e:  # safetensors and torch raise their own types for a corrupt file
        raise ConversionError(f"{path}: cannot read it ({type(e).__name__}: {e})") from None
    return self._open[path]

  def _shape(self, name: str) -> tuple[int, ...]:
    h = self._handle(self._files[name])
    return tuple(h.get_slice(name).get_shape()) if self.kind == "safetensors" else tuple(h[name].shape)

  def close(self) -> None:
    """Unmaps the files: pages read through safetensors' mmap otherwise stay resident while a handle lives."""
    self._open.clear()

  def get(self, name: str) -> np.ndarray:
    if name not in self._files:
      raise hf.MappingError(f"{name}: missing from the checkpoint")
    h = self._handle(self._files[name])
    if self.kind == "safetensors":
      return h.get_tensor(name)
    t = h[name]
    return t.numpy() if t.dtype.is_floating_point and t.dtype.itemsize == 4 else t.float().numpy()


def load_hf_params(hf_dir: str | os.PathLike, model_cfg: ModelConfig, shardings: Any = None) -> dict:
  """Our parameter tree for `model_cfg` from an HF directory, checked against it tensor by tensor.

  With `shardings` (a NamedSharding tree like the params, or one Sharding for all)
  every leaf is placed as soon as it is read, each process copying only its own shards.
  """
  import jax
  from_hf = hf.model_config_from_hf(read_hf_config(hf_dir), model_cfg)
  weights = HFWeights(hf_dir)
  hf.check_hf_shapes(weights.shapes, model_cfg)
  hf.check_same_architecture(model_cfg, from_hf)
  params: dict = {}
  for leaf in hf.leaves(model_cfg, model_cfg.scan_layers):
    x = hf.leaf_from_hf(leaf, weights.get, _np_dtype(model_cfg.param_dtype))
    if shardings is not None:
      x = _place(x, shardings if isinstance(shardings, jax.sharding.Sharding) else hf.get_path(shardings, leaf.path))
    hf.set_path(params, leaf.path, x)
  weights.close()
  return params


def load_hf_model(hf_dir: str | os.PathLike, base: Optional[ModelConfig] = None) -> tuple[ModelConfig, dict]:
  """(our ModelConfig, numpy params) for an HF StableLm directory; other fields of the config from `base`."""
  model_cfg = hf.model_config_from_hf(read_hf_config(hf_dir), base)
  return model_cfg, load_hf_params(hf_dir, model_cfg)


def _place(x: np.ndarray, sharding) -> Any:
  import jax
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


# ---------------------------------------------------------------------------
# Writing Hugging Face directories.


def check_out_dir(out_dir: str | os.PathLike, overwrite: bool) -> Path:
  """Refuses a file, or a non-empty directory without `overwrite`; touches nothing."""
  out = Path(out_dir)
  if out.exists() and not out.is_dir():
    raise ConversionError(f"{out}: exists and is not a directory")
  if out.is_dir() and any(out.iterdir()) and not overwrite:
    raise ConversionError(f"{out}: exists and is not empty (pass --overwrite to replace its contents)")
  return out


@contextlib.contextmanager
def staged_out_dir(out_dir: str | os.PathLike, overwrite: bool,
                   outputs: tuple[str, ...] = _HF_OUTPUTS) -> Iterator[Path]:
  """Yields an empty temporary sibling of `out_dir` to write into. When the block completes, its contents
  become `out_dir` (with `overwrite`, after removing only our own outputs from it); when it raises, the
  temporary directory is deleted and `out_dir` is left exactly as it was, so a failed or refused
  conversion never leaves a half-written model behind."""
  out = check_out_dir(out_dir, overwrite)
  parent = out.absolute().parent
  try:
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
  except OSError as e:
    raise ConversionError(f"{out}: cannot create it ({e.strerror or e})") from None
  try:
    yield tmp
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; an export is meant to be shared
    if out.is_dir():
      for pattern in outputs:
        for p in out.glob(pattern):
          shutil.rmtree(p) if p.is_dir() else p.unlink()
      for p in tmp.iterdir():
        os.replace(p, out / p.name)
      tmp.rmdir()
    else:
      os.replace(tmp, out)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp, ignore_errors=True)


def _write_json(path: Path, obj: Any) -> None:
  path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def save_hf_model(params: Mapping | Callable[[tuple], np.ndarray], model_cfg: ModelConfig, out_dir: str | os.PathLike,
                  dtype: str = "float32", scan_layers: Optional[bool] = None,
                  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> dict:
  """Writes config.json, generation_config.json and sharded model-XXXXX-of-YYYYY.safetensors + index.

  `params` is our tree or a function from a leaf path to its array (read on
  demand). Memory: one leaf plus at most one shard of converted tensors.
  Returns {"shards", "total_bytes", "num_params"}.
  """
  from safetensors.numpy import save_file
  if dtype not in EXPORT_DTYPES:
    raise ConversionError(f"dtype: must be one of {EXPORT_DTYPES}, got {dtype!r}")
  scan = model_cfg.scan_layers if scan_layers is None else scan_layers
  get_leaf = params if callable(params) else (lambda path: hf.get_path(params, path))
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  _write_json(out / "config.json", hf.hf_config_dict(model_cfg, dtype))
  _write_json(out / "generation_config.json", hf.generation_config_dict())
  target = _np_dtype(dtype)
  shard: dict[str, np.ndarray] = {}
  files: list[list[str]] = []
  shard_bytes = total_bytes = num_params = 0

  def flush():
    nonlocal shard, shard_bytes
    if shard:
      path = out / f"_shard{len(files):05d}.safetensors"
      save_file(shard, path, metadata={"format": "pt"})
      os.chmod(path, 0o644)  # the writer creates 0600 files; an export is meant to be shared
      files.append(list(shard))
      shard, shard_bytes = {}, 0

  for leaf in hf.leaves(model_cfg, scan):
    for name, y in hf.leaf_to_hf(leaf, np.asarray(get_leaf(leaf.path))):
      y = np.ascontiguousarray(y, dtype=target)
      if shard and shard_bytes + y.nbytes > max_shard_bytes:
        flush()
      shard[name] = y
      shard_bytes += y.nbytes
      total_bytes += y.nbytes
      num_params += y.size
  flush()
  weight_map = {}
  for i, names in enumerate(files):
    final = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
    (out / f"_shard{i:05d}.safetensors").rename(out / final)
    weight_map.update({n: final for n in names})
  _write_json(out / SAFE_INDEX, {"metadata": {"total_size": total_bytes}, "weight_map": weight_map})
  return {"shards": len(files), "total_bytes": total_bytes, "num_params": num_params}


# ---------------------------------------------------------------------------
# Export and import: our checkpoints <-> Hugging Face directories.


def export_checkpoint(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, step: Optional[int] = None,
                      dtype: str = "float32", overwrite: bool = False,
                      max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> dict:
  """A workdir's (or checkpoints folder's) params -> a Hugging Face directory, tokenizer included."""
  from ar_lm_jax import saved_run
  from ar_lm_jax.hf_tokenizer import save_hf_tokenizer
  from ar_lm_jax.tokenizer import N_VOCAB, load_tokenizer
  if dtype not in EXPORT_DTYPES:
    raise ConversionError(f"dtype: must be one of {EXPORT_DTYPES}, got {dtype!r}")
  ckpt_dir = saved_run.checkpoints_dir(checkpoint)
  step, cfg = saved_run.saved_config(ckpt_dir, step)
  saved_run.check_saved_shapes(ckpt_dir, step, cfg.model)
  if cfg.model.vocab_size < N_VOCAB:
    raise hf.MappingError(f"model.vocab_size={cfg.model.vocab_size} has no rows for the tokenizer's {N_VOCAB} ids")
  hf.hf_config_dict(cfg.model)  # refuses an architecture HF cannot express before anything is written
  tokenizer = load_tokenizer(cfg.data.tokenizer_path)  # a missing ranks file too
  with staged_out_dir(out_dir, overwrite) as tmp:
    # Each group of params is checked against its fingerprints as it streams; a mismatch raises here,
    # before the temporary directory becomes --out.
    summary = save_hf_model(saved_run.CheckpointParams(ckpt_dir, step, cfg), cfg.model, tmp, dtype,
                            cfg.model.scan_layers, max_shard_bytes)
    save_hf_tokenizer(tokenizer, str(tmp))
    from ar_lm_jax import chat
    if chat.trains_on_chat(cfg.data):  # a fine-tuned chat model: its template, and generation stops at <|im_end|>
      chat.write_hf_chat_files(str(tmp), cfg.data.chat_template)
    (tmp / RUN_CONFIG).write_text(dumps(cfg))
  return {"out": str(Path(out_dir)), "step": step, "dtype": dtype, **summary}


def import_hf(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, cfg: Optional[Config] = None,
              overwrite: bool = False) -> dict:
  """An HF StableLm directory -> a params-only step-0 checkpoint in workdir layout (see the module doc).

  Without `cfg`, the run config is the one an export of ours saved next to the
  weights, else the defaults with the HF architecture (data.seq_len capped at
  its max_position_embeddings).
  """
  import jax
  from ar_lm_jax import saved_run
  from ar_lm_jax.checkpoint import Checkpointer
  from_hf = hf.model_config_from_hf(read_hf_config(hf_dir), cfg.model if cfg else None)
  if cfg is None and (Path(hf_dir) / RUN_CONFIG).is_file():
    try:
      cfg = from_dict(Config, json.loads((Path(hf_dir) / RUN_CONFIG).read_text()))
    except (json.JSONDecodeError, ConfigError) as e:
      raise ConversionError(f"{Path(hf_dir) / RUN_CONFIG}: {e}") from None
  if cfg is None:
    seq_len = min(DataConfig().seq_len, from_hf.max_position_embeddings)
    cfg = Config(name=f"hf-{Path(hf_dir).absolute().name}", model=from_hf,
                 data=dataclasses.replace(DataConfig(), seq_len=seq_len))
  check_out_dir(out_dir, overwrite)  # before the long read, not after it
  # Each leaf goes to a device as it is read: orbax saves jax arrays with about a third of the
  # transient memory it needs for numpy ones.
  params = load_hf_params(hf_dir, cfg.model, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  with staged_out_dir(out_dir, overwrite, saved_run.WORKDIR_LAYOUT) as tmp:
    (tmp / "config.json").write_text(dumps(cfg))
    ckpt = Checkpointer(tmp / "checkpoints", cfg)
    ckpt.save(0, {"step": np.zeros((), np.int32), "params": params}, force=True)
    ckpt.wait()
    ckpt.close()
  out = Path(out_dir)
  n = sum(int(x.size) for x in jax.tree.leaves(params))
  return {"out": str(out), "checkpoints": str(out / "checkpoints"), "step": 0, "num_params": n,
          "model": dataclasses.asdict(cfg.model)}
