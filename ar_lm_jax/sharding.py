"""The device mesh and the one table that lays every tensor out on it.

Megatron-style tensor parallelism over `model` (q/k/v and gate/up column-parallel,
o and down row-parallel, embedding and LM head vocab-parallel), data parallelism
over `data`. ZeRO-1 adds `data` to the AdamW moments only, so each data replica
keeps a slice of the optimizer state while parameters stay replicated over
`data`; FSDP (optional) shards the parameters over `data` as well.

This module knows nothing of training: it maps logical axis names to mesh axes.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ar_lm_jax.config import Config, ConfigError, MeshConfig

DATA, MODEL = "data", "model"


def logical_rules(mesh_cfg: MeshConfig) -> tuple[tuple[str, Any], ...]:
  """Logical axis name -> mesh axis (None: replicated). The single place that says how tensors are laid out."""
  return (
      # parameters
      ("vocab", MODEL),  # embedding rows and LM-head columns: vocab-parallel
      ("heads", MODEL),  # q/k/v column-parallel, o row-parallel
      ("mlp", MODEL),  # gate/up column-parallel, down row-parallel
      ("embed", DATA if mesh_cfg.fsdp else None),  # FSDP: weights split over data too, gathered per layer
      ("head_dim", None),
      ("norm", None),
      ("layers", None),
      # activations
      ("batch", DATA),
      ("length", None),
      ("act_embed", None),
      ("act_heads", MODEL),
      ("act_mlp", MODEL),
      ("act_vocab", MODEL),
  )


def resolve_mesh_shape(mesh_cfg: MeshConfig, num_devices: int) -> tuple[int, int]:
  data, model = mesh_cfg.data, mesh_cfg.model
  if data == -1:
    if num_devices % model:
      raise ConfigError(f"mesh.model: {model} does not divide the {num_devices} devices")
    data = num_devices // model
  if data * model != num_devices:
    raise ConfigError(f"mesh: data={data} x model={model} = {data * model} does not match the {num_devices} devices "
                      f"(mesh.data=-1 takes the devices mesh.model leaves)")
  return data, model


def validate(cfg: Config, num_devices: int, num_processes: int = 1) -> tuple[int, int]:
  """The mesh shape, after checking that the model and batch divide over it."""
  data, model = resolve_mesh_shape(cfg.mesh, num_devices)
  m = cfg.model
  if m.num_heads % model:
    raise ConfigError(f"mesh.model: {model} does not divide model.num_heads={m.num_heads}")
  if m.intermediate_size % model:
    raise ConfigError(f"mesh.model: {model} does not divide model.intermediate_size={m.intermediate_size}")
  if m.vocab_size % model:
    raise ConfigError(f"mesh.model: {model} does not divide model.vocab_size={m.vocab_size}")
  micro = cfg.data.batch_size // cfg.optim.grad_accum_steps
  if micro % data:
    raise ConfigError(f"data.batch_size: the micro-batch of {micro} sequences "
                      f"(batch_size {cfg.data.batch_size} / grad_accum_steps {cfg.optim.grad_accum_steps}) "
                      f"does not divide over mesh.data={data}")
  # Each process loads only its own slice of the batch, so a data replica (one row of the mesh)
  # must not straddle processes: two processes would have to load the same rows.
  if data % num_processes:
    raise ConfigError(f"mesh.model: {model} spans processes ({num_devices // num_processes} devices each); "
                      f"mesh.data={data} must be a multiple of the {num_processes} processes")
  return data, model


def device_grid(devices: list, data: int, model: int) -> np.ndarray:
  """Devices as a [data, model] array, process-major.

  Each process's devices then fill whole rows, so its local batch is one contiguous
  slice of the global batch (what make_array_from_process_local_data assumes) and each
  model-parallel group sits on neighbouring devices of one host (the fast links).
  """
  ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
  grid = np.empty(len(ordered), dtype=object)
  grid[:] = ordered
  return grid.reshape(data, model)


def make_mesh(cfg: Config, devices=None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  num_processes = len({d.process_index for d in devices})
  data, model = validate(cfg, len(devices), num_processes)
  return Mesh(device_grid(devices, data, model), (DATA, MODEL))


def logical_to_sharding(logical_specs: Any, mesh: Mesh, mesh_cfg: MeshConfig) -> Any:
  return nn.logical_to_mesh_sharding(logical_specs, mesh, logical_rules(mesh_cfg))


def param_shardings(boxed_abstract_params: Any, mesh: Mesh, mesh_cfg: MeshConfig) -> Any:
  return logical_to_sharding(nn.get_partition_spec(boxed_abstract_params), mesh, mesh_cfg)


def add_data_axis(sharding: NamedSharding, shape: tuple, data_size: int) -> NamedSharding:
  """ZeRO: the same layout, additionally split over `data` on the largest dim that divides."""
  spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
  used = {a for s in spec for a in (s if isinstance(s, tuple) else (s,)) if a}
  if DATA in used or data_size == 1:
    return sharding
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if spec[dim] is None and shape[dim] % data_size == 0:
      spec[dim] = DATA
      return NamedSharding(sharding.mesh, P(*spec))
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):  # fall back to nesting under an existing axis
    cur = spec[dim]
    if cur is not None:
      axes = cur if isinstance(cur, tuple) else (cur,)
      n = int(np.prod([sharding.mesh.shape[a] for a in axes]))
      if shape[dim] % (n * data_size) == 0:
        spec[dim] = (*axes, DATA)
        return NamedSharding(sharding.mesh, P(*spec))
  return sharding


def moment_shardings(params_shardings: Any, abstract_params: Any, mesh: Mesh, zero1: bool) -> Any:
  """The layout of the AdamW moments, shaped like the params: each param's layout, plus `data` under ZeRO-1.

  Under ZeRO-1 the train step also reduces the gradients into this layout, so that no device keeps a
  reduced gradient it does not update.
  """
  data_size = mesh.shape[DATA]

  def for_param(sharding, shape_struct):
    return add_data_axis(sharding, shape_struct.shape, data_size) if zero1 else sharding

  return jax.tree.map(for_param, params_shardings, abstract_params)


def opt_state_shardings(tx: optax.GradientTransformation, abstract_opt_state: Any, params_shardings: Any,
                        abstract_params: Any, mesh: Mesh, zero1: bool) -> Any:
  """Moments follow their parameter's layout (plus `data` under ZeRO-1); counters are replicated."""
  moments = moment_shardings(params_shardings, abstract_params, mesh, zero1)
  replicated = NamedSharding(mesh, P())
  return optax.tree_map_params(
      tx, lambda _, s: s, abstract_opt_state, moments,
      transform_non_params=lambda _: replicated)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA, None))


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """Assembles each process's slice into global arrays sharded over `data` (no host ever holds the whole batch)."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def bytes_per_device(abstract_tree: Any, shardings: Any) -> int:
  """Bytes of the largest per-device shard summed over leaves, from shapes alone."""
  total = 0
  for x, s in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings, is_leaf=lambda v: isinstance(v, NamedSharding))):
    shard = s.shard_shape(x.shape)
    total += int(np.prod(shard)) * np.dtype(x.dtype).itemsize
  return total
