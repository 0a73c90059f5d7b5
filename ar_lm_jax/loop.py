"""The training loop: restore or initialize, then step, log, evaluate and checkpoint.

The host never waits on the device inside the loop: the metrics of step N are
read after step N+1 has been dispatched.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Optional

import jax
import numpy as np

from ar_lm_jax import data as data_lib
from ar_lm_jax import distributed
from ar_lm_jax import evaluate as evaluate_lib
from ar_lm_jax import aot, flops, sharding
from ar_lm_jax import step as step_lib
from ar_lm_jax.checkpoint import Checkpointer
from ar_lm_jax.config import Config, ConfigError, dumps
from ar_lm_jax.distributed import say as _say
from ar_lm_jax.metrics import MetricsWriter

log = logging.getLogger("ar_lm_jax")


class NonFiniteError(RuntimeError):
  """The run stopped after train.max_bad_steps consecutive steps with a non-finite loss or gradient."""


# ---------------------------------------------------------------------------
# Stopping: preemption signals and non-finite steps.


class StopRequest:
  """SIGTERM/SIGINT ask the loop to stop after the step in flight, checkpoint, and exit 0.

  The handler only sets a flag that the loop polls with `requested(step)`. Processes must stop at
  the same step (each saves its shards of the same checkpoint), so in a multi-process run the
  flags are all-gathered every `check_every` steps, the same steps on every process; a
  single-process run checks every step without a collective. After the first signal the
  previous handlers are back, so a second Ctrl-C or SIGTERM acts at once.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self, check_every: int):
    self.check_every = check_every
    self.signal: Optional[str] = None  # the name of the signal this process received, if any
    self.signalled: dict[int, str] = {}  # process index -> its signal, once the processes agreed to stop
    self._agreed = False
    self._previous: dict[int, Any] = {}

  def install(self) -> "StopRequest":
    if threading.current_thread() is threading.main_thread():  # Python only lets the main thread set handlers
      for s in self.SIGNALS:
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def uninstall(self) -> None:
    for s, h in self._previous.items():
      signal.signal(s, h)
    self._previous = {}

  def _handle(self, signum: int, frame: Any) -> None:
    del frame
    self.signal = signal.Signals(signum).name
    self.uninstall()
    # os.write, not print: the handler may run in the middle of a print of the main thread.
    os.write(2, f"\n{self.signal}: stopping after the current step and saving a checkpoint "
                f"(send it again to stop at once)\n".encode())

  def requested(self, step: int) -> bool:
    if jax.process_count() == 1:
      if self.signal is not None and not self.signalled:
        self.signalled = {0: self.signal}
      return self.signal is not None
    if not self._agreed and step % self.check_every == 0:
      from jax.experimental import multihost_utils
      got = self.signal and signal.Signals[self.signal]
      numbers = np.asarray(multihost_utils.process_allgather(np.int32(got or 0)))
      self.signalled = {i: signal.Signals(int(n)).name for i, n in enumerate(numbers) if n}
      self._agreed = bool(self.signalled)
    return self._agreed

  def describe(self) -> str:
    """'SIGTERM' in a single-process run; 'SIGTERM on process 1 of 2' when the processes stopped for another's signal."""
    if jax.process_count() == 1 or not self.signalled:
      return self.signal or ""
    names = sorted(set(self.signalled.values()))
    return f"{'/'.join(names)} on process {', '.join(map(str, sorted(self.signalled)))} of {jax.process_count()}"


class BadStepGuard:
  """Counts consecutive steps whose loss or gradient was not finite (train_step left the state as it was).

  `observe` reads a step's `finite` metric (blocking until that step is done), once per step and in
  order; the loop reads each step's flag after dispatching the next, and at once only where it
  must know before saving.
  """

  def __init__(self, max_bad_steps: int):
    self.max_bad_steps = max_bad_steps
    self.streak = 0  # consecutive non-finite steps up to the last one observed
    self.first_bad: Optional[int] = None  # first step of the current streak
    self._seen = -1

  def observe(self, step: int, finite: Any) -> None:
    if step <= self._seen:
      return
    self._seen = step
    if bool(jax.device_get(finite)):
      self.streak, self.first_bad = 0, None
    else:
      self.streak += 1
      self.first_bad = step if self.streak == 1 else self.first_bad

  def finite_at(self, step: int, finite: Any) -> bool:
    """Whether `step` was finite, so that the state after it is the last good one and may be saved."""
    self.observe(step, finite)
    return self.streak == 0

  @property
  def tripped(self) -> bool:
    return self.streak >= self.max_bad_steps

  def error(self, last_good_checkpoint: Optional[int], directory: Path) -> NonFiniteError:
    where = (f"the last good checkpoint is step {last_good_checkpoint} in {directory}" if last_good_checkpoint is not None
             else "no checkpoint was saved")
    return NonFiniteError(
        f"stopped: {self.streak} consecutive steps ({self.first_bad}-{self._seen}) had a non-finite loss or gradient "
        f"(train.max_bad_steps={self.max_bad_steps}); their updates were skipped and nothing was saved after them; {where}")


def run(cfg: Config, workdir: str | Path) -> dict[str, Any]:
  """Trains `cfg` in `workdir`; returns a summary (first/last loss, steps, paths)."""
  workdir = Path(workdir).absolute()
  is_main = jax.process_index() == 0
  if cfg.train.epochs and not cfg.train.steps:  # experiments.train resolves and prints it; library callers get it here
    from ar_lm_jax import epochs
    cfg, plan = epochs.resolve(cfg, workdir)
    _say(plan.describe(cfg))
  setup = step_lib.build(cfg)
  if is_main:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(dumps(cfg))
  _say(f"mesh {dict(setup.mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} devices, "
       f"{jax.process_count()} process(es)")

  ckpt = Checkpointer(workdir / "checkpoints", cfg)
  distributed.note_progress(checkpoints=ckpt.directory)  # for the line that reports a lost peer
  data_iter = data_lib.make_train_iterator(cfg.data, seed=cfg.train.seed, process_index=jax.process_index(),
                                           process_count=jax.process_count())
  restored = ckpt.restore_latest(setup.abstract_state, setup.state_shardings)
  if restored is not None:
    state = restored.state
    # Every process's saved state: a run may resume on another process count (the data order is global).
    data_iter.set_state(restored.data_states if restored.data_states is not None else restored.data_state)
    _say(f"resuming from checkpoint step {restored.step} in {ckpt.directory}")
  elif cfg.checkpoint.init_from:  # a fresh run (step 0, fresh optimizer) from given weights; a resume wins
    from ar_lm_jax import hf_io, saved_run
    source = cfg.checkpoint.init_from
    if not Path(source).is_dir():
      raise ConfigError(f"checkpoint.init_from: {source} is not a directory")
    read = saved_run.init_params if saved_run.is_our_checkpoint(source) else hf_io.load_hf_params  # ours, else HF's
    params = read(source, cfg.model, setup.state_shardings.params)
    state = step_lib.state_from_params(setup, params)
    _say(f"initialized the parameters from {cfg.checkpoint.init_from}")
  else:
    state = step_lib.init_state(setup, cfg.train.seed)
  start_step = int(jax.device_get(state.step))

  with setup.activate():
    compiled = aot.compile_fn(step_lib.jit_train_step(setup), setup.abstract_state, step_lib.abstract_batch(cfg))
  compile_s = compiled.compile_s
  _say(f"train step compiled in {compile_s:.1f}s")

  # Held-out sets read, packed and the eval function compiled once, before the loop.
  evaluator = evaluate_lib.TrainEvaluator(setup) if cfg.train.eval_every else None
  harness = None
  if cfg.train.harness_every:  # lm-eval is imported only when asked for: training never needs it
    from ar_lm_jax import harness as harness_lib
    harness = harness_lib.TrainHarness(setup)
  writer = MetricsWriter(workdir, enabled=is_main, total_steps=cfg.train.steps, progress=cfg.train.progress)
  writer.start_at(start_step)
  tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
  flops_per_token = flops.model_flops_per_token(cfg.model, cfg.data.seq_len)
  peak = flops.peak_flops_per_device()
  first_loss = last_loss = None
  pending: Optional[tuple[int, dict, dict]] = None
  t_last, step_last = time.perf_counter(), start_step

  def report(step: int, metrics: dict, data_stats: dict) -> None:
    nonlocal first_loss, last_loss, t_last, step_last
    m = jax.device_get(metrics)
    loss = float(m["loss"])
    first_loss = loss if first_loss is None else first_loss
    last_loss = loss
    now = time.perf_counter()
    tps = (step - step_last) * tokens_per_step / max(now - t_last, 1e-9)
    t_last, step_last = now, step
    row = {"loss": loss, "lr": float(m["lr"]), "grad_norm": float(m["grad_norm"]), "tokens_per_sec": tps,
           "skipped_steps": int(m["skipped_steps"])}
    row["scored_tokens"] = int(m["tokens"])  # targets the loss averaged over (fine-tuning: the assistant tokens)
    if peak:
      row["mfu"] = flops.mfu(tps, flops_per_token, peak, jax.device_count())
    row.update(data_stats)  # with data/batch_hash, the global batch's fingerprint
    writer.write(step, row)
    writer.progress(step, loss, tps)

  # Checkpoints, preemption and non-finite steps: a state is saved only when its last step was finite,
  # so the newest checkpoint is always the last good one; a due save during a bad streak waits for a good step.
  end_step = min(cfg.train.stop_after or cfg.train.steps, cfg.train.steps)
  bad = BadStepGuard(cfg.train.max_bad_steps)
  stop = StopRequest(cfg.checkpoint.stop_check_every).install()
  step, finite = start_step, None  # finite: the last step's flag, read once the next step is queued behind it
  try:
    while step < end_step and not stop.requested(step):
      distributed.note_progress(step=step)
      local_batch = next(data_iter)
      batch = sharding.global_batch(local_batch, setup.mesh)
      state, metrics = compiled(state, batch)
      step += 1
      if finite is not None:
        bad.observe(step - 1, finite)
      finite = metrics["finite"]
      if pending is not None:
        report(*pending)
        pending = None
      if step % cfg.train.log_every == 0 or step == end_step:
        # Stats as of this step's batch, summed over processes (a collective: every process, same steps).
        pending = (step, metrics, data_iter.stats())
      if bad.tripped:
        break
      if evaluator is not None and step % cfg.train.eval_every == 0:
        jax.block_until_ready(state)  # the eval waits for this step anyway; waiting here keeps its time out of t_eval
        t_eval = time.perf_counter()
        writer.write(step, evaluator(state.params))
        t_last += time.perf_counter() - t_eval  # keep eval time out of the next tokens_per_sec
      if harness is not None and step % cfg.train.harness_every == 0:
        jax.block_until_ready(state)
        t_harness = time.perf_counter()
        writer.write(step, harness(state.params, step))  # {} on processes other than 0, which only follow
        t_last += time.perf_counter() - t_harness  # keep the harness's time out of the next tokens_per_sec
      if ckpt.due(step) and bad.finite_at(step, finite):
        ckpt.save(step, state, data_iter.get_state())
    if pending is not None:
      report(*pending)
    if bad.tripped:
      raise bad.error(ckpt.last_saved_step, ckpt.directory)
    if step > start_step and step != ckpt.last_saved_step:
      if bad.finite_at(step, finite):
        ckpt.save(step, state, data_iter.get_state())
      else:
        _say(f"not saving step {step}: its last {bad.streak} step(s) were non-finite; "
             f"the last good checkpoint is step {ckpt.last_saved_step}")
    ckpt.wait()
    if stop.signalled or (stop.signal and jax.process_count() == 1):  # this process's signal, or another's (process 0 says which)
      _say(f"{stop.describe()}: stopped at step {step} with a checkpoint in {ckpt.directory}; "
           "run the same command again to continue")
  finally:
    stop.uninstall()
    ckpt.close()
    writer.close()
  summary = {"workdir": str(workdir), "metrics": str(workdir / "metrics.jsonl"),
             "checkpoints": str(ckpt.directory), "steps": step, "first_loss": first_loss, "last_loss": last_loss,
             "compile_s": compile_s,
             "stop_signal": stop.signal or next(iter(stop.signalled.values()), None),
             "stop_signal_processes": sorted(stop.signalled)}
  return summary
