"""Reading a saved run outside training: where its checkpoints are, what config a step was saved with,
and its params, checked against the fingerprints saved with them.

Every reader of our checkpoints goes through here (evaluate, generate, the harness, the notebook,
`checkpoint.init_from`, the export to Hugging Face), and every params read ends in `verify_params`,
so a damaged checkpoint is refused the same way, with the same words, everywhere. Only the params
are ever read, never the optimizer state. Nothing here writes or moves a checkpoint: moving damaged
ones aside is the training loop's job (`checkpoint.Checkpointer`).

Errors are CheckpointError (bad input: the command line exits 2 with its line), except a saved
param whose shape the config does not give, which is the HF mapping's MappingError.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from ar_lm_jax import config as config_lib
from ar_lm_jax import hf
from ar_lm_jax import step as step_lib
from ar_lm_jax.checkpoint import CheckpointError, fingerprints, quiet_orbax_leftovers, short_error

RUNS_DIR = Path("runs")  # where `experiments.train` writes, relative to the current directory
# What a workdir holds for its readers (a run's, or an HF import's, which writes exactly these).
WORKDIR_LAYOUT = ("config.json", "checkpoints")


# ---------------------------------------------------------------------------
# Where a run's checkpoints are.


def default_workdir(runs_dir: str | os.PathLike = RUNS_DIR, env: str = "AR_LM_JAX_WORKDIR") -> Path:
  """$AR_LM_JAX_WORKDIR, else the newest run in runs/ that has checkpoints (where `experiments.train` writes)."""
  if os.environ.get(env):
    return Path(os.environ[env])
  runs = sorted((p for p in Path(runs_dir).glob("*") if (p / "checkpoints").is_dir()), key=lambda p: p.stat().st_mtime)
  if not runs:
    raise CheckpointError(f"${env} is not set and {runs_dir} holds no run with checkpoints; "
                          "train one with `python -m experiments.train`")
  return runs[-1]


def checkpoint_location(workdir: Optional[str] = None, checkpoint: Optional[str] = None,
                        step: Optional[int] = None) -> tuple[Path, Optional[int]]:
  """(orbax checkpoints directory, step) from `--workdir` or `--checkpoint` (a checkpoints directory,
  one step's directory, or a run's workdir)."""
  if (workdir is None) == (checkpoint is None):
    raise CheckpointError("give exactly one of --workdir and --checkpoint")
  path = Path(checkpoint if checkpoint is not None else workdir)
  if not path.is_dir():
    raise CheckpointError(f"{path} is not a directory")
  if workdir is not None or (path / "checkpoints").is_dir():
    path = path / "checkpoints"
  elif path.name.isdigit() and (path / "state").is_dir():
    if step is not None and step != int(path.name):
      raise CheckpointError(f"--step={step} contradicts the checkpoint directory {path}")
    path, step = path.parent, int(path.name)
  return path, step


def checkpoints_dir(path: str | os.PathLike) -> Path:
  """A workdir's `checkpoints/` folder, or `path` itself when it is that folder."""
  p = Path(path)
  if not p.is_dir():
    raise CheckpointError(f"{path}: no such directory")
  return p / "checkpoints" if (p / "checkpoints").is_dir() else p


def is_our_checkpoint(path: str | os.PathLike) -> bool:
  """Whether `path` is one of our workdirs or checkpoints folders (else, for init_from, an HF directory)."""
  p = Path(path)
  return p.is_dir() and ((p / "checkpoints").is_dir() or bool(ocp.utils.checkpoint_steps(p)))


# ---------------------------------------------------------------------------
# What a step holds: its config, fingerprints and param shapes (no array is read).


def saved_config(directory: str | Path, step: Optional[int] = None) -> tuple[int, config_lib.Config]:
  """(step, the config it was saved with) of a checkpoints folder; the latest step when `step` is None."""
  directory = Path(directory)
  steps = sorted(ocp.utils.checkpoint_steps(directory)) if directory.is_dir() else []
  if step is None:
    if not steps:
      raise CheckpointError(f"no checkpoint in {directory}")
    step = steps[-1]
  elif step not in steps:
    raise CheckpointError(f"no checkpoint of step {step} in {directory} (steps: {steps or 'none'})")
  try:
    d = ocp.handlers.JsonCheckpointHandler().restore(epath.Path(directory / str(step) / "config"))
  except Exception as e:  # noqa: BLE001
    raise CheckpointError(f"cannot read the config of checkpoint {directory}/{step} ({short_error(e)})") from None
  try:
    return step, config_lib.from_dict(config_lib.Config, d)
  except config_lib.ConfigError as e:  # named as the checkpoint's, not as a flag's
    raise CheckpointError(f"the config saved in {directory}/{step} no longer parses: {e}") from None


def read_fingerprints(directory: str | Path, step: int) -> dict[str, int]:
  """{leaf path: checksum} saved with checkpoint `step` of a checkpoints folder; CheckpointError when it has none."""
  path = Path(directory) / str(step) / "fingerprint"
  if not path.is_dir():
    raise CheckpointError(f"checkpoint {Path(directory) / str(step)} has no fingerprint item, so its arrays cannot "
                          "be checked; refusing to read it")
  try:
    saved = ocp.handlers.JsonCheckpointHandler().restore(epath.Path(path))
  except Exception as e:  # noqa: BLE001
    raise CheckpointError(f"cannot read the fingerprint of checkpoint {Path(directory) / str(step)} "
                          f"({short_error(e)})") from None
  if not isinstance(saved, dict):
    raise CheckpointError(f"the fingerprint of checkpoint {Path(directory) / str(step)} is not a JSON object")
  return saved


def _abstract_leaves(model_cfg: config_lib.ModelConfig) -> dict:
  """{leaf path as a tuple of keys: ShapeDtypeStruct} of the params `model_cfg` describes."""
  import flax.linen as nn
  from ar_lm_jax.model import abstract_params
  flat = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(abstract_params(model_cfg)))[0]
  return {tuple(k.key for k in path): a for path, a in flat}


def saved_param_shapes(ckpt_dir: Path, step: int) -> dict:
  """Our path -> shape of every saved parameter, from the checkpoint's metadata (no array is read)."""
  # checkpoint.py's layout: each step holds a "state" item whose "params" subtree is read alone.
  try:
    meta = ocp.PyTreeCheckpointHandler().metadata(Path(ckpt_dir) / str(step) / "state")
  except Exception as e:  # noqa: BLE001 - a cut or garbled _METADATA: the reader raises JSON, OS or orbax errors
    raise CheckpointError(f"cannot read the params of checkpoint step {step} in {ckpt_dir} "  # restore_params' words
                          f"(its metadata: {short_error(e)})") from None
  tree = getattr(meta, "tree", meta)
  if "params" not in tree:
    raise CheckpointError(f"{ckpt_dir}/{step}: the saved state has no params")
  flat = jax.tree_util.tree_flatten_with_path(tree["params"])[0]
  return {tuple(k.key for k in path): tuple(m.shape) for path, m in flat}


def check_saved_shapes(ckpt_dir: Path, step: int, model_cfg: config_lib.ModelConfig) -> None:
  """Raises MappingError naming the first parameter whose saved shape differs from `model_cfg`'s."""
  saved = saved_param_shapes(ckpt_dir, step)
  for path, a in _abstract_leaves(model_cfg).items():
    name = "params/" + "/".join(path)
    if path not in saved:
      raise hf.MappingError(f"{name}: missing from the checkpoint in {ckpt_dir}/{step} (the config expects {a.shape})")
    if saved[path] != tuple(a.shape):
      raise hf.MappingError(f"{name}: checkpoint shape {saved[path]} does not match the config's {tuple(a.shape)}")


# ---------------------------------------------------------------------------
# The params, verified.


def verify_params(directory: str | Path, step: int, params: Any, saved: Optional[dict[str, int]] = None) -> None:
  """Raises CheckpointError naming the step and the arrays when `params` (all of a checkpoint's params, or
  any subtree of them as read by a streaming export) differ from the fingerprints saved with them.

  Every reader of our checkpoints outside training goes through here (evaluate, generate, the notebook,
  init_from, the export), so a damaged checkpoint is refused the same way everywhere."""
  saved = read_fingerprints(directory, step) if saved is None else saved
  now = fingerprints({"params": params})
  bad = [k for k, v in now.items() if saved.get(k) != v]
  if bad:
    raise CheckpointError(f"checkpoint step {step} in {directory} is damaged: {len(bad)} param array(s) differ from "
                          f"the fingerprint taken when it was saved ({', '.join(bad[:3])}); refusing to read it")


def restore_params(directory: str | Path, step: int, cfg: config_lib.Config, shardings: Any = None,
                   only: Optional[list[tuple]] = None) -> Any:
  """The params (only; the optimizer state is never read) of a checkpoint: in `shardings`, or as host numpy
  arrays when None. Checked against the fingerprint saved with them (`verify_params`); an unreadable or
  damaged checkpoint raises CheckpointError.

  `only` (leaf paths inside the params, host arrays only) reads just those leaves, for a streaming export."""
  import flax.linen as nn
  from ar_lm_jax.model import abstract_params
  path = Path(directory) / str(step)
  saved = read_fingerprints(directory, step)  # before the long read: a checkpoint without one is refused at once
  if only is not None:
    assert shardings is None, "a partial read gives host arrays"
    flat = _abstract_leaves(cfg.model)
    abstract = {}
    for leaf in only:
      hf.set_path(abstract, tuple(leaf), flat[tuple(leaf)])
  else:
    abstract = nn.meta.unbox(abstract_params(cfg.model))
  if shardings is None:
    item = jax.tree.map(lambda _: 0, abstract)
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), abstract)
  else:
    item = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    restore_args = ocp.checkpoint_utils.construct_restore_args(item)
  quiet_orbax_leftovers()
  try:
    out = ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).restore(
        epath.Path(path / "state"),
        args=ocp.args.PyTreeRestore(item={"params": item}, restore_args={"params": restore_args}, partial_restore=True))
  except Exception as e:  # noqa: BLE001 - whatever the reader raises (a truncated chunk), this checkpoint cannot be used
    raise CheckpointError(f"cannot read the params of checkpoint step {step} in {directory} ({short_error(e)})") from None
  params = out["params"]
  verify_params(directory, step, params, saved)
  return params


class CheckpointParams:
  """A checkpoint's parameters as numpy arrays, read a group of leaves at a time on demand.

  Called with a leaf path in `hf.leaves` order, it restores the next group of up
  to `group_bytes` (partial restore: the optimizer state is never read) and hands
  each leaf out once, so an export never holds the whole model: restoring the
  whole tree at once peaks at about three copies of it. Each group is checked
  against the checkpoint's fingerprints as it is read (`restore_params`),
  so a damaged checkpoint raises before the export that streams it is complete.
  """

  def __init__(self, ckpt_dir: Path, step: int, cfg: config_lib.Config, group_bytes: int = 1 << 30):
    self._ckpt_dir, self._step, self._cfg = Path(ckpt_dir), step, cfg
    self._structs = _abstract_leaves(cfg.model)
    self._groups: list[list[tuple]] = []
    size = group_bytes
    for leaf in hf.leaves(cfg.model, cfg.model.scan_layers):
      a = self._structs[leaf.path]
      nbytes = int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize
      if size + nbytes > group_bytes:
        self._groups.append([])
        size = 0
      self._groups[-1].append(leaf.path)
      size += nbytes
    self._group_of = {path: i for i, g in enumerate(self._groups) for path in g}
    self._loaded: dict[tuple, np.ndarray] = {}

  def __call__(self, path: tuple) -> np.ndarray:
    if path not in self._loaded:
      self._loaded = {}  # drop what is left of the previous group before reading the next
      self._loaded = self._restore(self._groups[self._group_of[path]])
    return self._loaded.pop(path)

  def _restore(self, paths: list[tuple]) -> dict[tuple, np.ndarray]:
    params = restore_params(self._ckpt_dir, self._step, self._cfg, only=paths)
    return {path: hf.get_path(params, path) for path in paths}


def init_params(source: str | os.PathLike, model_cfg: config_lib.ModelConfig, shardings: Any) -> Any:
  """Parameters for a fresh run from `checkpoint.init_from` when it names one of our runs (its latest step).

  The arrays land directly in `shardings`; a checkpoint saved with the other
  `scan_layers` layout is re-laid-out on the host first, through the HF names.
  """
  ckpt_dir = checkpoints_dir(source)
  step, saved = saved_config(ckpt_dir, None)
  hf.check_same_architecture(model_cfg, saved.model, f"the checkpoint in {ckpt_dir}/{step}")
  if saved.model.scan_layers == model_cfg.scan_layers:
    check_saved_shapes(ckpt_dir, step, model_cfg)
    return restore_params(ckpt_dir, step, saved.replace(model=model_cfg), shardings)
  check_saved_shapes(ckpt_dir, step, saved.model)
  read = CheckpointParams(ckpt_dir, step, saved)
  tensors: dict[str, np.ndarray] = {}
  for leaf in hf.leaves(saved.model, saved.model.scan_layers):
    tensors.update(hf.leaf_to_hf(leaf, read(leaf.path)))
  params: dict = {}
  for leaf in hf.leaves(model_cfg, model_cfg.scan_layers):
    x = hf.leaf_from_hf(leaf, tensors.pop, jnp.dtype(model_cfg.param_dtype))
    hf.set_path(params, leaf.path, jax.make_array_from_callback(x.shape, hf.get_path(shardings, leaf.path),
                                                                lambda index, x=x: x[index]))
  return params


# ---------------------------------------------------------------------------
# A run loaded for use: evaluation, generation, the harness, the notebook.


def for_devices(cfg: config_lib.Config, num_devices: int, batch_rows: Optional[int] = None) -> config_lib.Config:
  """The run's config fitted to the devices at hand: its tensor-parallel size where it divides them, else 1,
  and a batch of `batch_rows` (default: the run's micro-batch) rounded up to a multiple of the data axis."""
  model_axis = cfg.mesh.model if num_devices % cfg.mesh.model == 0 else 1
  data_axis = num_devices // model_axis
  rows = batch_rows or cfg.data.batch_size // cfg.optim.grad_accum_steps
  rows = -(-rows // data_axis) * data_axis
  return cfg.replace(mesh=dataclasses.replace(cfg.mesh, data=data_axis, model=model_axis),
                     data=dataclasses.replace(cfg.data, batch_size=rows),
                     optim=dataclasses.replace(cfg.optim, grad_accum_steps=1))


@dataclasses.dataclass
class LoadedRun:
  setup: step_lib.Setup  # the run's model and shardings, fitted to these devices
  params: Any  # placed in setup.state_shardings.params
  step: int  # the checkpoint's step
  directory: Path  # the orbax checkpoints folder it came from


def load_run(workdir: Optional[str] = None, checkpoint: Optional[str] = None, step: Optional[int] = None,
             batch_rows: Optional[int] = None) -> LoadedRun:
  """The params (only) of a training checkpoint, in the run's shardings, with its config."""
  directory, step = checkpoint_location(workdir, checkpoint, step)
  step, cfg = saved_config(directory, step)
  setup = step_lib.build(for_devices(cfg, jax.device_count(), batch_rows))
  params = restore_params(directory, step, setup.cfg, setup.state_shardings.params)
  return LoadedRun(setup, params, step, directory)
