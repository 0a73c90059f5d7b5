"""The train state, the pure train step, and its jitted, sharded form.

config -> (tokenizer -> data) and (model -> sharding -> optim) -> step -> loop -> checkpoint/metrics.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ar_lm_jax import batch as batch_lib
from ar_lm_jax import loss as loss_lib
from ar_lm_jax import optim, sharding
from ar_lm_jax.config import Config
from ar_lm_jax.model import StableLM, abstract_params, lm_head_kernel



@flax.struct.dataclass
class TrainState:
  """What the train step reads and returns: a pytree, of arrays (or, in `Setup`, of their shapes and shardings).

  The checkpoint's "state" item is this tree, its arrays named by the field names
  (`params.layers...`, `opt_state.1.mu...`, `step`): renaming a field breaks every saved run.
  """
  step: Any  # int32 []: updates applied, skipped ones included
  params: Any  # the model's parameters, unboxed (model.py's tree)
  opt_state: Any  # optim.build_optimizer's optax state
  skipped_steps: Any  # int32 []: updates left out because the loss or gradient was not finite


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything about a run that is derived from the config and the devices, and holds no arrays."""
  cfg: Config
  mesh: Mesh
  model: StableLM
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  abstract_state: TrainState  # of ShapeDtypeStructs
  state_shardings: TrainState  # of NamedShardings
  grad_shardings: Any = None  # NamedShardings of the gradients, shaped like params: the moments' layout (ZeRO-1)

  @contextlib.contextmanager
  def activate(self):
    """The mesh and logical-axis rules that activation constraints resolve against while tracing."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(sharding.logical_rules(self.cfg.mesh)):
      yield


def build(cfg: Config, devices=None) -> Setup:
  """Mesh, model, optimizer and the abstract sharded train state; allocates nothing."""
  mesh = sharding.make_mesh(cfg, devices)
  model = StableLM(cfg.model)
  tx = optim.build_optimizer(cfg.optim, cfg.train.steps)
  schedule = optim.build_schedule(cfg.optim, cfg.train.steps)
  boxed = abstract_params(cfg.model)
  params_abs = nn.meta.unbox(boxed)
  params_sh = sharding.param_shardings(boxed, mesh, cfg.mesh)
  opt_abs = jax.eval_shape(tx.init, params_abs)
  opt_sh = sharding.opt_state_shardings(tx, opt_abs, params_sh, params_abs, mesh, cfg.mesh.shard_optimizer_over_data)
  grad_sh = sharding.moment_shardings(params_sh, params_abs, mesh, cfg.mesh.shard_optimizer_over_data)
  scalar = jax.ShapeDtypeStruct((), jnp.int32)
  replicated = NamedSharding(mesh, P())
  abstract_state = TrainState(step=scalar, params=params_abs, opt_state=opt_abs, skipped_steps=scalar)
  state_shardings = TrainState(step=replicated, params=params_sh, opt_state=opt_sh, skipped_steps=replicated)
  return Setup(cfg, mesh, model, tx, schedule, abstract_state, state_shardings, grad_sh)


def _step_zero(params: Any, tx: optax.GradientTransformation) -> TrainState:
  zero = jnp.zeros((), jnp.int32)
  return TrainState(step=zero, params=params, opt_state=tx.init(params), skipped_steps=zero)


def init_state(setup: Setup, seed: int) -> TrainState:
  """Initializes parameters and optimizer state directly into their shardings."""

  def init_fn(key):
    tokens = jnp.zeros((1, 8), jnp.int32)
    return _step_zero(nn.meta.unbox(setup.model.init(key, tokens)["params"]), setup.tx)

  return jax.jit(init_fn, out_shardings=setup.state_shardings)(jax.random.key(seed))


def state_from_params(setup: Setup, params: Any) -> TrainState:
  """A fresh step-0 state around given parameters (e.g. loaded from Hugging Face), placed in the run's shardings."""
  params = jax.device_put(params, setup.state_shardings.params)
  fn = functools.partial(_step_zero, tx=setup.tx)
  return jax.jit(fn, out_shardings=setup.state_shardings, donate_argnums=0)(params)


def loss_sums(model: StableLM, params, batch: dict, cfg: Config):
  """(sum of NLL, sum of log(Z)^2) over the batch's scored positions."""
  hidden_BTD = model.apply({"params": params}, batch["tokens"], batch["segment_ids"], batch["positions"], return_hidden=True)
  targets_BT, mask_BT = loss_lib.targets_and_mask(batch["tokens"], batch["segment_ids"], batch.get("loss_mask"))
  # The chunked loss keeps one LM-head gradient partial per data shard, reduced once after its loop
  # (gcd: a batch that does not divide over `data`, e.g. an eval batch, still gets a valid grouping).
  groups = math.gcd(dict(jax.sharding.get_abstract_mesh().shape).get(sharding.DATA, 1), batch["tokens"].shape[0])
  return loss_lib.nll_sums(hidden_BTD, lm_head_kernel(params), targets_BT, mask_BT, cfg.model.dtype, cfg.train.loss_chunk_size,
                           z_grad=cfg.optim.z_loss > 0, grad_groups=groups)


def loss_and_grads(params, batch: dict, *, model: StableLM, cfg: Config):
  """Mean NLL over every scored token of the batch and its gradient, over `optim.grad_accum_steps` micro-batches.

  Each micro-batch's loss is divided by the token count of the whole batch, so
  the accumulated gradient equals the gradient of one large batch while memory
  holds one micro-batch's activations (the micro-batches run under lax.scan).
  """
  accum = cfg.optim.grad_accum_steps
  # Scored tokens of the whole batch (the loss mask of chat data included): every micro-batch divides by it.
  _, mask_BT = loss_lib.targets_and_mask(batch["tokens"], batch["segment_ids"], batch.get("loss_mask"))
  n_tokens = jnp.maximum(jnp.sum(mask_BT), 1).astype(jnp.float32)
  z = cfg.optim.z_loss

  def objective(params, micro):
    s_nll, s_z = loss_sums(model, params, micro, cfg)
    return (s_nll + z * s_z) / n_tokens, s_nll

  grad_fn = jax.value_and_grad(objective, has_aux=True)
  if accum == 1:
    (_, s_nll), grads = grad_fn(params, batch)
  else:
    # [B, T] -> [A, B/A, T] taking every A-th row, so each micro-batch keeps the batch's data sharding.
    def split(x_BT):
      b = x_BT.shape[0] // accum
      x = jnp.swapaxes(x_BT.reshape(b, accum, *x_BT.shape[1:]), 0, 1)
      return jax.lax.with_sharding_constraint(x, P(None, sharding.DATA))

    def body(carry, micro):
      g_acc, nll_acc = carry
      (_, s_nll), g = grad_fn(params, micro)
      return (jax.tree.map(jnp.add, g_acc, g), nll_acc + s_nll), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    (grads, s_nll), _ = jax.lax.scan(body, (zeros, jnp.zeros((), jnp.float32)), jax.tree.map(split, batch))
  return s_nll / n_tokens, grads, n_tokens


def train_step(state: TrainState, batch: dict, *, model: StableLM, tx: optax.GradientTransformation,
               schedule: optax.Schedule, cfg: Config, grad_shardings: Any = None) -> tuple[TrainState, dict]:
  """One optimizer update; a pure function of (state, batch).

  A step whose loss or gradient is not finite leaves params and optimizer state
  unchanged and is counted in `skipped_steps`; the lr of update s is schedule(s)
  all the same (skipped steps included), the one logged.

  ZeRO-1 (`grad_shardings`: the moments' layout): the gradients are reduced
  onto the moment shards (the compiler's reduction is followed by a slice to the
  shard, which XLA:GPU rewrites into a reduce-scatter where the slice follows it
  directly), the global norm and the AdamW update are computed on the shards, and
  only the new parameters are all-gathered, once per leaf after its update.
  """
  params = state.params
  loss, grads, n_tokens = loss_and_grads(params, batch, model=model, cfg=cfg)
  if grad_shardings is not None:
    grads = jax.lax.with_sharding_constraint(grads, grad_shardings)
  grad_norm = optax.tree.norm(grads)
  step = state.step + 1
  updates, new_opt_state = tx.update(grads, state.opt_state, params, step=step)
  new_params = optax.apply_updates(params, updates)
  ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
  new_state = TrainState(step=step, params=keep(new_params, params), opt_state=keep(new_opt_state, state.opt_state),
                         skipped_steps=state.skipped_steps + (1 - ok.astype(jnp.int32)))
  metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(step), "tokens": n_tokens,
             "finite": ok, "skipped_steps": new_state.skipped_steps}
  return new_state, metrics


def jit_train_step(setup: Setup) -> Callable:
  """The train step jitted with explicit shardings, donating the old state."""
  step = functools.partial(train_step, model=setup.model, tx=setup.tx, schedule=setup.schedule, cfg=setup.cfg,
                           grad_shardings=setup.grad_shardings)
  batch_sh = sharding.batch_sharding(setup.mesh)
  # One sharding for every batch array (a pytree prefix): batches with or without a loss_mask.
  batch_shardings = batch_sh
  replicated = NamedSharding(setup.mesh, P())
  return jax.jit(step, in_shardings=(setup.state_shardings, batch_shardings),
                 out_shardings=(setup.state_shardings, replicated), donate_argnums=0)


def abstract_batch(cfg: Config) -> dict:
  """The train step's batch (`batch.KEYS`, data.batch_size x data.seq_len) as ShapeDtypeStructs, to compile it ahead of time."""
  return batch_lib.abstract(cfg.data.batch_size, cfg.data.seq_len)
