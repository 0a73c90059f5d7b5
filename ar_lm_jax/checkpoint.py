"""A training run's checkpoints: what it saves, and how its train state comes back on resume.

A checkpoint is `checkpoints/<step>/` with four orbax items:
  state        the train state (params, AdamW state, step, skipped_steps) as sharded arrays
  data         every process's data-iterator state, `process_<i>-of-<n>.json` (each process writes its own)
  config       the resolved run config (JSON)
  fingerprint  a 32-bit position-weighted checksum of every state leaf, taken on device when saving

Orbax writes a step into `<step>.orbax-checkpoint-tmp` and renames it when complete, so a crash in the
middle of a save never leaves a listed step. What the rename cannot catch is a finished checkpoint
that is damaged later: a truncated file raises on read, but a flipped byte in an array chunk or
the arrays of another step copied in by mistake read back as plausible numbers without any error.
The fingerprint catches those. It is a wrapping uint32 sum,
the same on any mesh, so a restore onto another mesh checks it too.

Nothing is deleted except by the keep policy: an unfinished save or a damaged checkpoint is renamed
to `<name>.partial-<time>` / `<step>.corrupt-<time>` with a warning, and only the newest
checkpoint.keep_aside of each kind are kept.

The state holds no RNG: nothing after init is random (no dropout), and the data order is a function
of train.seed and the saved iterator state.

Reading a saved run outside training (evaluation, generation, export, init_from) is `saved_run`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers

from ar_lm_jax import config as config_lib
from ar_lm_jax.distributed import say as _say

ITEMS = ("state", "data", "config", "fingerprint")
UNFINISHED_SUFFIX = ".orbax-checkpoint-tmp"  # orbax's name for a save in progress (orbax/_src/path/atomicity_types.py)


class CheckpointError(config_lib.ConfigError):
  """No usable checkpoint where one is needed, or one that does not fit the run.

  A ConfigError, so that command-line faces exit 2 with its one-line message: the input (the
  workdir, the flags) is what is wrong, and nothing has been trained.
  """


class _Unusable(Exception):
  """A checkpoint that cannot be read back intact (the message says why)."""


def _warn(msg: str) -> None:
  if jax.process_index() == 0:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def short_error(e: BaseException, innermost: bool = False) -> str:
  """The exception's type and first line; `innermost`: of its deepest cause (orbax wraps TensorStore's error,
  which names the array, in one that names only the slices read)."""
  while innermost and e.__cause__ is not None:
    e = e.__cause__
  first = (str(e).strip().splitlines() or [""])[0]
  return f"{type(e).__name__}: {first[:300]}"


def _orbax_leftover(unraisable: Any) -> bool:
  """Whether an 'Exception ignored' report is the debris of a failed orbax read: the coroutines still
  pending when its event loop closed, and TensorStore callbacks into that closed loop."""
  exc = unraisable.exc_value
  obj = unraisable.object
  closed_loop = isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc)
  pending_read = getattr(getattr(obj, "cr_code", None), "co_filename", "").find("orbax") >= 0
  return closed_loop or pending_read


# TensorStore's errors are absl statuses: 'OUT_OF_RANGE: Error reading "params.x/0.0" in OCDBT database ...'.
_TENSORSTORE_READ_ERROR = re.compile(r"\b[A-Z_]+: Error (reading|opening) ")


def _orbax_unretrieved(record: logging.LogRecord) -> bool:
  """Whether an asyncio log record is a failed orbax read's other futures ('... exception was never
  retrieved'), logged when the garbage collector reaches them, so only on some runs. They come in
  two forms: orbax's wrapper (an orbax frame in the traceback, 'Encountered error while reading
  array') and TensorStore's own read future, whose error has no Python traceback at all."""
  message = record.getMessage()
  if "exception was never retrieved" not in message:
    return False
  tb = record.exc_info[2] if record.exc_info else None
  files = []
  while tb is not None:
    files.append(tb.tb_frame.f_code.co_filename)
    tb = tb.tb_next
  exc = record.exc_info[1] if record.exc_info else None
  return (any("orbax" in f for f in files) or "Encountered error while reading array" in message
          or bool(_TENSORSTORE_READ_ERROR.search(message)) or bool(exc and _TENSORSTORE_READ_ERROR.search(str(exc))))


class _DropOrbaxUnretrieved(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return not _orbax_unretrieved(record)


def quiet_orbax_leftovers() -> None:
  """After a failed array read, orbax's unfinished coroutines print 100-300 lines of 'Exception ignored'
  and 'Event loop is closed' as they are collected, and asyncio logs the other reads' errors as 'never
  retrieved'; the warning line says everything they would."""
  asyncio_log = logging.getLogger("asyncio")
  if not any(isinstance(f, _DropOrbaxUnretrieved) for f in asyncio_log.filters):
    asyncio_log.addFilter(_DropOrbaxUnretrieved())
  previous = sys.unraisablehook
  if getattr(previous, "_ar_lm_jax", False):
    return
  def hook(unraisable):
    if not _orbax_leftover(unraisable):
      previous(unraisable)
  hook._ar_lm_jax = True
  sys.unraisablehook = hook


def _key_str(k: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def path_str(path: tuple) -> str:
  """A pytree path as 'params/layers/mlp/up_proj/kernel' (the same for a dict, a namedtuple, a dataclass such as
  step.TrainState, or orbax metadata: attribute keys give their name)."""
  return "/".join(_key_str(k) for k in path)


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


_MESSAGE_BYTES = 600  # of each process's verdict message in _agreed's all-gather
_OK, _UNUSABLE, _DOES_NOT_FIT, _FAILED = range(4)


def _agreed(read: Any) -> Any:
  """Runs `read()` on this process, then gives every process the same verdict with one all-gather.

  Returns read's result when it succeeded everywhere. Otherwise raises, on every process alike:
  CheckpointError when the step does not fit the run on some process; _Unusable naming the
  process(es) whose part could not be read; RuntimeError when a read failed unexpectedly (a bug,
  not damage: nothing is moved aside).
  """
  kind, message, result = _OK, "", None
  try:
    result = read()
  except CheckpointError as e:
    kind, message = _DOES_NOT_FIT, str(e)
  except _Unusable as e:
    kind, message = _UNUSABLE, str(e)
  except Exception as e:  # noqa: BLE001 - reported below, on every process
    if jax.process_count() == 1:
      raise
    kind, message = _FAILED, short_error(e)
  outcomes = [(kind, message)]
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    buf = np.zeros(_MESSAGE_BYTES + 1, np.uint8)
    encoded = message.encode()[:_MESSAGE_BYTES]
    buf[0], buf[1:1 + len(encoded)] = kind, np.frombuffer(encoded, np.uint8)
    rows = np.asarray(multihost_utils.process_allgather(buf))
    outcomes = [(int(r[0]), bytes(r[1:]).rstrip(b"\0").decode(errors="replace")) for r in rows]
  who = (lambda i: f"process {i}: ") if len(outcomes) > 1 else (lambda i: "")
  for k, error in ((_FAILED, RuntimeError), (_DOES_NOT_FIT, CheckpointError)):
    failed = [(i, m) for i, (ki, m) in enumerate(outcomes) if ki == k]
    if failed:
      i, m = failed[0]
      raise error(f"{who(i)}{m}" if k == _FAILED else m)
  unusable = [f"{who(i)}{m}" for i, (k, m) in enumerate(outcomes) if k == _UNUSABLE]
  if unusable:
    # The same damage seen by every process (a shared file) is said once.
    same = len(set(m for k, m in outcomes if k == _UNUSABLE)) == 1 and len(unusable) == len(outcomes)
    raise _Unusable(outcomes[0][1] if same else "; ".join(unusable))
  return result


def _everywhere(flag: bool) -> bool:
  """Whether `flag` holds on every process (a small all-gather in multi-process runs)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.int32(flag))))


# ---------------------------------------------------------------------------
# Fingerprints.


def _leaf_fingerprint(x: jax.Array) -> jax.Array:
  """sum_i bits(x_i) * w_i mod 2**32 with odd, position-dependent w_i: any change of one element changes it."""
  itemsize = jnp.dtype(x.dtype).itemsize
  if x.dtype == jnp.bool_ or itemsize == 1:
    bits = x.astype(jnp.uint32)
  elif itemsize == 2:
    bits = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
  elif itemsize == 4:
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  else:
    raise TypeError(f"no fingerprint for dtype {x.dtype}")
  index = jnp.zeros(x.shape, jnp.uint32)
  stride = 1
  for d in reversed(range(x.ndim)):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, x.shape, d) * np.uint32(stride % 2**32)
    stride *= x.shape[d]
  weight = index * np.uint32(0x9E3779B1) * np.uint32(2) + np.uint32(1)
  return jnp.sum(bits * weight, dtype=jnp.uint32)


_fingerprint_tree = jax.jit(lambda tree: jax.tree.map(_leaf_fingerprint, tree))


def fingerprints(tree: Any) -> dict[str, int]:
  """{leaf path: uint32 checksum} of a pytree of (sharded) arrays, computed where the arrays live."""
  if not any(isinstance(x, jax.Array) for x in jax.tree.leaves(tree)):
    tree = jax.device_put(tree, jax.devices("cpu")[0])  # host arrays (a conversion): never copy them onto an accelerator
  sums = jax.device_get(_fingerprint_tree(tree))
  return {path_str(p): int(v) for p, v in jax.tree_util.tree_flatten_with_path(sums)[0]}


def _mismatches(tree: Any, saved: dict[str, int]) -> list[str]:
  now = fingerprints(tree)
  return [k for k, v in now.items() if saved.get(k) != v]


# ---------------------------------------------------------------------------
# Per-process JSON (the data iterators' states).


def _process_file() -> str:
  return f"process_{jax.process_index()}-of-{jax.process_count()}.json"


class _ProcessJsonHandler(ocp.handlers.JsonCheckpointHandler):
  """Every process writes and reads its own file (the stock JSON handler writes on the primary process only)."""

  def __init__(self):
    super().__init__(filename=_process_file(),
                     multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=None))


def _read_data_states(directory: Path) -> list:
  """Every process's data-iterator state of a checkpoint (`process_<i>-of-<n>.json`), in process order.

  All of them, not only this process's: the data order is global (see `data`), so a run resumed on
  another number of processes takes each virtual shard's state from whichever file holds it. Every
  process reads every file, so all agree on whether the checkpoint is usable.
  """
  found = {}
  for p in directory.glob("process_*-of-*.json"):
    m = re.fullmatch(r"process_(\d+)-of-(\d+)\.json", p.name)
    if m:
      found[(int(m.group(1)), int(m.group(2)))] = p
  counts = sorted({n for _, n in found})
  if not counts:
    raise _Unusable("its data item holds no iterator state")
  if len(counts) > 1:
    raise _Unusable(f"its data item holds iterator states of {counts} processes")
  n = counts[0]
  missing = [f"process_{i}-of-{n}.json" for i in range(n) if (i, n) not in found]
  if missing:
    raise _Unusable(f"its data item lacks {missing[0]}")
  states = []
  for i in range(n):
    try:
      states.append(json.loads(found[(i, n)].read_text()))
    except (OSError, ValueError) as e:
      raise _Unusable(f"cannot read data/{found[(i, n)].name} ({short_error(e)})") from None
  return states


@ocp.args.register_with_handler(_ProcessJsonHandler, for_save=True)
@dataclasses.dataclass
class _ProcessJsonSave(ocp.args.CheckpointArgs):
  item: Any


@ocp.args.register_with_handler(_ProcessJsonHandler, for_restore=True)
@dataclasses.dataclass
class _ProcessJsonRestore(ocp.args.CheckpointArgs):
  item: Any = None


# ---------------------------------------------------------------------------
# The run's checkpoints.


@dataclasses.dataclass
class Restored:
  step: int
  state: Any  # in the shardings asked for
  data_state: Optional[dict]  # this process's data-iterator state (None when saved by another process count)
  config: dict  # the config the checkpoint was saved with
  data_states: Optional[list] = None  # every saving process's data-iterator state, in process order


class Checkpointer:
  """A run's `checkpoints/` folder: async saves under a keep policy, and a restore that checks what it reads."""

  def __init__(self, directory: str | Path, cfg: config_lib.Config):
    self.directory = Path(directory).absolute()
    self.cfg = cfg
    c = cfg.checkpoint
    keep = [checkpoint_managers.LatestN(c.keep)]
    if c.keep_every:
      keep.append(checkpoint_managers.EveryNSteps(c.keep_every))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=checkpoint_managers.AnyPreservationPolicy(keep),
        enable_async_checkpointing=c.async_save,
        create=True,
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options)
    self.last_saved_step = self.manager.latest_step()

  def due(self, step: int) -> bool:
    """Whether a multiple of checkpoint.every_steps has passed since the last save (a skipped one stays due)."""
    every = self.cfg.checkpoint.every_steps
    return every > 0 and step // every * every > (self.last_saved_step or 0)

  def save(self, step: int, state: Any, data_state: Optional[dict] = None, force: bool = False) -> bool:
    """Starts saving `state` (and this process's `data_state`) as `step`; returns once the arrays are copied off
    the devices, so the caller may donate them. A params-only state (no data_state) is for conversions."""
    items = {
        "state": ocp.args.StandardSave(state),
        "config": ocp.args.JsonSave(config_lib.to_dict(self.cfg)),
        "fingerprint": ocp.args.JsonSave(fingerprints(state)),
    }
    if data_state is not None:
      items["data"] = _ProcessJsonSave(data_state)
    saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
    if saved:
      self.last_saved_step = step
    return saved

  def restore_latest(self, abstract_state: Any, shardings: Any) -> Optional[Restored]:
    """The newest checkpoint that reads back intact, placed in `shardings`; None in a fresh directory.

    A checkpoint that cannot be read, or whose arrays differ from their fingerprint, is moved aside
    to `<step>.corrupt-<time>` with one warning line and the previous one is tried; when none is left,
    CheckpointError. An intact checkpoint that does not fit this run (another model shape, a
    params-only conversion, another process count) raises CheckpointError and nothing is moved:
    the run is what is wrong, not the checkpoint.

    In a multi-process run every process reads its part without any collective, then one all-gather
    gives every process the same verdict (usable, unusable and why, does not fit), so that all move a
    step aside, fall back or stop together: a process whose own file is damaged never leaves the
    others waiting in a barrier it skipped.
    """
    self._move_aside_unfinished()
    steps = sorted(self.manager.all_steps(), reverse=True)
    if not steps:
      corrupt = sorted(p.name for p in self.directory.glob("*.corrupt-*"))
      if corrupt:
        raise CheckpointError(f"{self.directory} holds only checkpoints moved aside as corrupt ({', '.join(corrupt)}); "
                              "remove them, or use another workdir, to start from scratch")
      return None
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)
    problems = []
    for step in steps:
      try:
        small = _agreed(lambda: self._read_small(step, target))
        state = _agreed(lambda: self._read_state(step, target))
        _agreed(lambda: self._check_fingerprints(state, small["fingerprint"]))
      except _Unusable as e:
        moved = self._move_aside(self.directory / str(step), "corrupt")
        _warn(f"checkpoint step {step} is unusable: {e}; moved it to {moved.name}"
              + ("; trying the previous one" if step != steps[-1] else ""))
        problems.append(f"step {step}: {e}")
        continue
      self.last_saved_step = step
      self._note_config_changes(step, small["config"])
      return Restored(step, state, small["data"], small["config"], small["data_states"])
    raise CheckpointError(f"no usable checkpoint in {self.directory} ({'; '.join(problems)}); "
                          "each was moved aside as <step>.corrupt-<time>")

  def _read_small(self, step: int, target: Any) -> dict:
    """This process's reads of a step's config, fingerprint, data state and array metadata (no collective)."""
    path = self.directory / str(step)
    missing = [item for item in ITEMS if not (path / item).is_dir()]
    if missing == ["data"]:
      raise CheckpointError(f"checkpoint step {step} in {self.directory} has no data-iterator state: it is a "
                            "params-only checkpoint (a conversion?); start a run from it with checkpoint.init_from")
    if missing:
      raise _Unusable(f"its {', '.join(missing)} item(s) are missing")
    data_states = _read_data_states(path / "data")
    # The handlers themselves, not the manager: its restore ends in a barrier that a process whose
    # read failed would skip.
    small = {}
    for item in ("config", "fingerprint"):
      try:
        small[item] = ocp.handlers.JsonCheckpointHandler().restore(epath.Path(path / item))
      except Exception as e:  # noqa: BLE001 - whatever the reader raises, this checkpoint cannot be used
        raise _Unusable(f"cannot read {item}/metadata ({short_error(e)})") from None
    small["data"] = data_states[jax.process_index()] if len(data_states) == jax.process_count() else None
    small["data_states"] = data_states
    try:
      saved = ocp.StandardCheckpointHandler().metadata(epath.Path(path / "state"))
      saved_shapes = {path_str(p): (tuple(m.shape), str(m.dtype))
                      for p, m in jax.tree_util.tree_flatten_with_path(saved.tree)[0]}
    except Exception as e:  # noqa: BLE001
      raise _Unusable(f"cannot read the state's metadata ({short_error(e)})") from None
    self._check_fits(step, saved_shapes, target)
    return small

  def _read_state(self, step: int, target: Any) -> Any:
    """This process's shards of a step's arrays, read by the handler (no barrier; see _read_small)."""
    quiet_orbax_leftovers()  # before the read: the collector may reach a failed read's futures during it
    try:
      return ocp.StandardCheckpointHandler().restore(epath.Path(self.directory / str(step) / "state"),
                                                     args=ocp.args.StandardRestore(target))
    except Exception as e:  # noqa: BLE001
      raise _Unusable(f"cannot read its state arrays ({short_error(e, innermost=True)})") from None

  def _check_fingerprints(self, state: Any, saved: dict) -> None:
    bad = _mismatches(state, saved)
    if bad:
      raise _Unusable(f"{len(bad)} array(s) differ from the fingerprint taken when it was saved ({', '.join(bad[:3])})")

  def _check_fits(self, step: int, saved: dict[str, tuple], target: Any) -> None:
    want = {path_str(p): (tuple(a.shape), str(a.dtype)) for p, a in jax.tree_util.tree_flatten_with_path(target)[0]}
    params_first = sorted(set(want) | set(saved), key=lambda k: (not k.startswith("params/"), k))
    wrong = [f"{k} is not in this run's state" if k not in want else f"{k} is missing" if k not in saved
             else f"{k} is {saved[k][0]} {saved[k][1]} there, {want[k][0]} {want[k][1]} here"
             for k in params_first if saved.get(k) != want.get(k)]
    if wrong:
      more = f" (and {len(wrong) - 2} more)" if len(wrong) > 2 else ""
      raise CheckpointError(f"checkpoint step {step} in {self.directory} does not fit this run's state: "
                            f"{'; '.join(wrong[:2])}{more}; is it the same model and optimizer config?")

  def _note_config_changes(self, step: int, saved: dict) -> None:
    now, then = _flatten(config_lib.to_dict(self.cfg)), _flatten(saved)
    diffs = [f"{k}: {then.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(now) | set(then)) if now.get(k) != then.get(k)]
    if diffs:
      _say(f"note: the config differs from checkpoint step {step}'s in {len(diffs)} key(s): {'; '.join(diffs[:8])}"
           + (" ..." if len(diffs) > 8 else ""))

  def _move_aside_unfinished(self) -> None:
    """Saves a crash interrupted would be deleted by orbax when it next saves that step; keep them, and say so."""
    for p in sorted(self.directory.glob(f"*{UNFINISHED_SUFFIX}*")):
      moved = self._move_aside(p, "partial")
      _warn(f"{p.name} in {self.directory} is a save that never finished (the run was killed while writing it); "
            f"moved it to {moved.name}")

  def _move_aside(self, path: Path, tag: str) -> Path:
    name = path.name.split(UNFINISHED_SUFFIX)[0]
    new = path.with_name(f"{name}.{tag}-{time.strftime('%Y%m%d-%H%M%S')}")
    _sync(f"ar_lm_jax_move_aside_{name}_start")
    if jax.process_index() == 0:
      n = 0
      while new.exists():
        n += 1
        new = new.with_name(f"{name}.{tag}-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
      os.replace(path, new)
      prune_aside(self.directory, self.cfg.checkpoint.keep_aside)  # damage that recurs must not fill the disk
    _sync(f"ar_lm_jax_move_aside_{name}_done")
    self.manager.reload()
    return new

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    """Waits for the save in flight, then closes."""
    self.manager.wait_until_finished()
    self.manager.close()


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(d, dict):
    return {k2: v2 for k, v in d.items() for k2, v2 in _flatten(v, f"{prefix}.{k}" if prefix else k).items()}
  if isinstance(d, list) and any(isinstance(x, (dict, list)) for x in d):
    return {k2: v2 for i, v in enumerate(d) for k2, v2 in _flatten(v, f"{prefix}[{i}]").items()}
  return {prefix: d}


def prune_aside(directory: str | Path, keep: int) -> list[Path]:
  """Deletes all but the newest `keep` moved-aside `.partial-*` and `.corrupt-*` directories (each kind counted
  on its own, by the time in their names); returns what it deleted. Process 0 only, like the moves."""
  import shutil
  removed = []
  if jax.process_index() != 0:
    return removed
  for tag in ("partial", "corrupt"):
    aside = sorted((p for p in Path(directory).glob(f"*.{tag}-*") if p.is_dir()),
                   key=lambda p: (p.name.split(f".{tag}-", 1)[1], p.name))
    for p in aside[:max(len(aside) - keep, 0)]:
      shutil.rmtree(p, ignore_errors=True)
      removed.append(p)
  return removed
