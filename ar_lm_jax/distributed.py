"""Multi-process runs once the processes joined (`startup.initialize`): the launch check, and how they notice one leaving.

A lost process is found by `PeerWatch`, a heartbeat over the coordination service's key-value store,
so that the survivors exit 1 with one line (which process, at which step, the last complete
checkpoint) within `checkpoint.peer_timeout_s`, before JAX's own heartbeat timeout would abort them
with a C++ check failure.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Optional, Sequence

import jax

from ar_lm_jax.config import Config, ConfigError
from ar_lm_jax.startup import slurm_tasks_on_this_node, slurm_visible_gpus, under_srun


# ---------------------------------------------------------------------------
# The launch against the mesh.


def launch_summary(devices: Sequence) -> str:
  """'2 process(es) x 8 local gpu device(s) = 16 devices' (or the per-process counts when they differ)."""
  per_process: dict[int, int] = {}
  for d in devices:
    per_process[d.process_index] = per_process.get(d.process_index, 0) + 1
  counts = sorted(set(per_process.values()))
  platform = devices[0].platform if devices else "?"
  local = (f"{counts[0]} local {platform} device(s)" if len(counts) == 1
           else "local " + platform + " devices " + "+".join(str(per_process[p]) for p in sorted(per_process)))
  return f"{len(per_process)} process(es) x {local} = {len(devices)} devices"


def check_launch(cfg: Config, devices: Optional[Sequence] = None, local_device_count: Optional[int] = None) -> str:
  """The launch line printed at start-up, after checking that the launch gives the mesh what it asks for.

  ConfigError (exit 2, one line) when the processes drive different numbers of devices, when an
  `srun` task drives fewer GPUs than SLURM gave it, or when an explicit mesh does not match the
  devices that joined.
  """
  devices = list(jax.devices() if devices is None else devices)
  local = jax.local_device_count() if local_device_count is None else local_device_count
  summary = launch_summary(devices)
  per_process: dict[int, int] = {}
  for d in devices:
    per_process[d.process_index] = per_process.get(d.process_index, 0) + 1
  if len(set(per_process.values())) > 1:
    raise ConfigError(f"the launch is uneven: {summary}; start the same number of devices on every process")
  gpus = slurm_visible_gpus() if under_srun() else None
  if gpus is not None and devices and devices[0].platform == "gpu" and not os.environ.get("JAX_LOCAL_DEVICE_IDS"):
    tasks = slurm_tasks_on_this_node()
    want = gpus if tasks == 1 else max(1, gpus // tasks)
    if local != want:
      raise ConfigError(f"this srun task drives {local} GPU(s) but SLURM gave it {want} ({tasks} task(s) on a node "
                        f"with {gpus} visible GPU(s)); launch: {summary}")
  m = cfg.mesh
  if m.data != -1 and m.data * m.model != len(devices):
    raise ConfigError(f"mesh: data={m.data} x model={m.model} needs {m.data * m.model} devices, but this launch joined "
                      f"{summary} (mesh.data=-1 takes the devices mesh.model leaves)")
  # The model and batch must divide over the mesh too: checked here, so a bad mesh prints its one
  # error line and not a launch line before it.
  from ar_lm_jax import sharding  # pylint: disable=import-outside-toplevel
  sharding.validate(cfg, len(devices), max(1, len(per_process)))
  return f"launch: {summary}"


# ---------------------------------------------------------------------------
# Lost peers.

_PREFIX = "ar_lm_jax/peer/"
_WATCH: Optional["PeerWatch"] = None


def last_complete_checkpoint(directory: Optional[Path]) -> Optional[int]:
  """The newest finished step in a checkpoints folder (orbax renames a step to its number only once all processes wrote it)."""
  if directory is None or not Path(directory).is_dir():
    return None
  steps = [int(p.name) for p in Path(directory).iterdir() if p.name.isdigit()]
  return max(steps) if steps else None


class PeerWatch:
  """Every process beats a key of the coordination service's store every timeout/5 seconds and reads the others'.

  A peer whose beat has not changed for `timeout_s`, or that announced it left with an error, is
  lost: this process prints one line and leaves with os._exit(1). os._exit, because a normal exit
  would wait in JAX's shutdown barrier for the dead peer, and a collective in flight (NCCL) may
  never return. A process leaving in turn writes `lost J` so that the others name the same peer.
  """

  def __init__(self, client, index: int, count: int, timeout_s: float):
    self.client, self.index, self.count, self.timeout_s = client, index, count, timeout_s
    self.interval_s = timeout_s / 5
    self.step: Optional[int] = None  # the step this process is at (the loop keeps it current)
    self.checkpoints: Optional[Path] = None  # the run's checkpoints folder, once known
    self._stop = threading.Event()
    self._verdict = threading.Event()  # set once a lost peer was found (the process is exiting)
    self._thread = threading.Thread(target=self._run, name="ar_lm_jax-peer-watch", daemon=True)

  def start(self) -> "PeerWatch":
    self._beat(0)
    self._thread.start()
    return self

  def _beat(self, n: int) -> None:
    self.client.key_value_set(f"{_PREFIX}{self.index}", f"alive {n}", allow_overwrite=True)

  def _run(self) -> None:
    last_ok = time.monotonic()
    seen: dict[int, tuple[str, float]] = {}  # peer -> (its value, when it last changed)
    n = 0
    while not self._stop.wait(self.interval_s):
      now = time.monotonic()
      try:
        n += 1
        self._beat(n)
        values = dict(self.client.key_value_dir_get(_PREFIX))
        last_ok = now
      except Exception:  # noqa: BLE001 - the coordination service (process 0) is unreachable
        if now - last_ok > self.timeout_s and self.index != 0:
          self._lost(0)
        continue
      for j in range(self.count):
        if j == self.index:
          continue
        v = values.get(f"{_PREFIX}{j}", "")
        if v.startswith("lost "):
          self._lost(int(v.split()[1]))
        elif v.startswith("left"):
          self._lost(j, v[len("left"):].strip())
        elif v == "done":
          continue
        elif j not in seen or seen[j][0] != v:
          seen[j] = (v, now)
        elif now - seen[j][1] > self.timeout_s:
          self._lost(j)

  def _lost(self, peer: int, error: Optional[str] = None) -> None:
    if self._stop.is_set():
      return
    self._verdict.set()
    at = f"at step {self.step}" if self.step is not None else "during start-up"
    m = last_complete_checkpoint(self.checkpoints)
    ckpt = f"the last complete checkpoint is step {m}" if m is not None else "no checkpoint was completed"
    what = f"stopped with an error {at} ({error})" if error else f"stopped responding {at}"
    sys.stdout.flush()
    os.write(2, f"error: process {peer} of {self.count} {what}; {ckpt}; run the same command again to resume from it\n"
             .encode())
    try:  # the others name the same peer, and do not wait for a heartbeat that stopped here too
      self.client.key_value_set(f"{_PREFIX}{self.index}", f"lost {peer}", allow_overwrite=True)
      if self.index == 0:  # this process hosts the coordination service: give the others a beat to read it
        time.sleep(min(2 * self.interval_s, 5))
    except Exception:  # noqa: BLE001
      pass
    os._exit(1)

  def await_verdict(self) -> bool:
    """After a failed collective: waits (at most a timeout and two beats) for the watch to find a lost peer.
    Returns False if none was found; when one is, the watch ends the process and this never returns."""
    found = self._verdict.wait(self.timeout_s + 2 * self.interval_s)
    if found:
      time.sleep(self.timeout_s)  # the watch is printing and exiting
    return found

  def leave(self, why: str) -> None:
    """Tells the others that this process stops with an error (they exit with one line naming it).

    Process 0 hosts the coordination service, whose end makes JAX abort the others at once: it waits
    (at most peer_timeout_s) until each has left, found it lost, or finished.
    """
    self._stop.set()
    try:
      self.client.key_value_set(f"{_PREFIX}{self.index}", f"left {why}", allow_overwrite=True)
      deadline = time.monotonic() + self.timeout_s
      while self.index == 0 and time.monotonic() < deadline:
        values = dict(self.client.key_value_dir_get(_PREFIX))
        if all(values.get(f"{_PREFIX}{j}", "").split(" ")[0] in ("left", "lost", "done") for j in range(1, self.count)):
          time.sleep(0.5)  # their os._exit follows their last write
          break
        time.sleep(0.1)
    except Exception:  # noqa: BLE001
      pass

  def finish(self) -> None:
    """A normal end: the others stop watching this process (it waits for them in JAX's shutdown barrier)."""
    self._stop.set()
    self._thread.join(timeout=self.interval_s + 1)
    try:
      self.client.key_value_set(f"{_PREFIX}{self.index}", "done", allow_overwrite=True)
    except Exception:  # noqa: BLE001
      pass


def start_watch(peer_timeout_s: int) -> "PeerWatch":
  """Starts this process's peer watch, once `startup.initialize` has joined the processes."""
  global _WATCH
  _WATCH = PeerWatch(_client(), jax.process_index(), jax.process_count(), peer_timeout_s).start()
  return _WATCH


def _client():
  from jax._src import distributed as jax_distributed  # the coordination service's key-value store
  return jax_distributed.global_state.client


def watch() -> Optional[PeerWatch]:
  """This process's peer watch (None in a single-process run)."""
  return _WATCH


def note_progress(step: Optional[int] = None, checkpoints: Optional[Path] = None) -> None:
  """What the lost-peer line reports: the step this process is at, and where the run's checkpoints are."""
  if _WATCH is not None:
    if step is not None:
      _WATCH.step = step
    if checkpoints is not None:
      _WATCH.checkpoints = Path(checkpoints)


def exit_after_error(e: BaseException, code: int, line: Optional[str] = None) -> None:
  """Ends a multi-process run that raised `e` on this process; never returns.

  `line` (an expected error: bad input, a failed run) is printed as it is. An unexpected error may
  be a collective that failed because a peer died (gloo raises at once; the watch needs up to
  peer_timeout_s to be sure): that ends in the watch's one line; otherwise the traceback is printed.
  Then the others are told, and the process leaves without JAX's shutdown barrier (the others may be
  stuck in a collective it will never join).
  """
  w = _WATCH
  if line is None:
    if w is not None:
      w.await_verdict()
    traceback.print_exception(e)
  else:
    print(line, file=sys.stderr)
  if w is not None:
    first = (str(e).strip().splitlines() or [""])[0][:200]
    w.leave(f"{type(e).__name__}: {first}")
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


def finish() -> None:
  if _WATCH is not None:
    _WATCH.finish()


# ---------------------------------------------------------------------------
# Output: one process speaks for the run.


def say(msg: str) -> None:
  """Prints `msg` on process 0 only: every process runs the same code, and N copies of a line say no more."""
  if jax.process_index() == 0:
    print(msg, flush=True)
