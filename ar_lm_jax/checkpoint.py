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
