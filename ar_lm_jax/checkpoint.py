"""Orbax checkpoints of the train state, the data iterator state and the resolved config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from ar_lm_jax import config as config_lib


class CheckpointError(RuntimeError):
  """No usable checkpoint where one was asked for."""


class Checkpointer:

  def __init__(self, directory: Path, cfg: config_lib.Config):
    self.directory = Path(directory).absolute()
    c = cfg.checkpoint
    options = ocp.CheckpointManagerOptions(
        max_to_keep=c.keep,
        keep_period=c.keep_every or None,
        enable_async_checkpointing=c.async_save,
        create=True,
    )
    self.cfg = cfg
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_state: Optional[dict] = None, force: bool = False) -> bool:
    items = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(config_lib.to_dict(self.cfg))}
    if data_state is not None:
      items["data"] = ocp.args.JsonSave(data_state)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, step: int, abstract_state: Any, shardings: Any, with_data: bool = True) -> tuple[Any, Optional[dict]]:
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)
    items = {"state": ocp.args.StandardRestore(target)}
    if with_data and (self.directory / str(step) / "data").exists():
      items["data"] = ocp.args.JsonRestore()
    out = self.manager.restore(step, args=ocp.args.Composite(**items))
    return out["state"], out.get("data") if with_data else None

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def _read_only_manager(directory: Path) -> ocp.CheckpointManager:
  if not Path(directory).is_dir():
    raise CheckpointError(f"no checkpoint directory at {directory}")
  # Not `read_only=True`: that only adds warnings; a manager that is never asked to save writes nothing.
  return ocp.CheckpointManager(Path(directory).absolute(), options=ocp.CheckpointManagerOptions(create=False))


def saved_config(directory: Path, step: Optional[int] = None) -> tuple[int, config_lib.Config]:
  """(step, the run's config saved with that checkpoint); `step=None` takes the latest."""
  manager = _read_only_manager(directory)
  try:
    steps = manager.all_steps()
    if not steps:
      raise CheckpointError(f"no checkpoint in {directory}")
    step = max(steps) if step is None else step
    if step not in steps:
      raise CheckpointError(f"no checkpoint for step {step} in {directory} (steps: {sorted(steps)})")
    saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
  finally:
    manager.close()
  return step, config_lib.from_dict(config_lib.Config, saved)


def restore_params(directory: Path, step: int, cfg: config_lib.Config, shardings: Any = None) -> Any:
  """The parameters alone of the train state saved at `step` (the optimizer state is never read).

  `shardings` (a NamedSharding tree like the params) places them; None puts every array on the first device.
  """
  from ar_lm_jax.model import abstract_params  # only readers of params need the model
  import flax.linen as nn
  shapes = nn.meta.unbox(abstract_params(cfg.model))
  if shardings is None:
    shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), shapes)
  target = {"params": jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings)}
  restore = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                   partial_restore=True)
  manager = _read_only_manager(directory)
  try:
    return manager.restore(step, args=ocp.args.Composite(state=restore))["state"]["params"]
  finally:
    manager.close()
