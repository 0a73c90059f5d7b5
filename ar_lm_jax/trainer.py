"""The training loop: restore or initialize, then step, log, evaluate and checkpoint.

The host never waits on the device inside the loop: the metrics of step N are
read after step N+1 has been dispatched.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Optional

import jax

from ar_lm_jax import data as data_lib
from ar_lm_jax import distributed
from ar_lm_jax import evaluate as evaluate_lib
from ar_lm_jax import perf, sharding
from ar_lm_jax import train as train_lib
from ar_lm_jax.checkpoint import BadStepGuard, Checkpointer, StopRequest
from ar_lm_jax.config import Config, dumps
from ar_lm_jax.metrics import MetricsWriter

log = logging.getLogger("ar_lm_jax")


def _say(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


def run(cfg: Config, workdir: str | Path) -> dict[str, Any]:
  """Trains `cfg` in `workdir`; returns a summary (first/last loss, steps, paths)."""
  workdir = Path(workdir).absolute()
  is_main = jax.process_index() == 0
  setup = train_lib.build(cfg)
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
    from ar_lm_jax import hf_io
    params = hf_io.init_params(cfg.checkpoint.init_from, cfg.model, setup.state_shardings["params"])
    state = train_lib.state_from_params(setup, params)
    _say(f"initialized the parameters from {cfg.checkpoint.init_from}")
  else:
    state = train_lib.init_state(setup, cfg.train.seed)
  start_step = int(jax.device_get(state["step"]))

  step_fn = train_lib.jit_train_step(setup)
  with setup.activate():
    t0 = time.perf_counter()
    compiled = step_fn.lower(setup.abstract_state, train_lib.abstract_batch(cfg)).compile()
    compile_s = time.perf_counter() - t0
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
  flops_per_token = perf.model_flops_per_token(cfg.model, cfg.data.seq_len)
  peak = perf.peak_flops_per_device()
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
      row["mfu"] = tps * flops_per_token / (peak * jax.device_count())
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
        writer.write(step, evaluator(state["params"]))
        t_last += time.perf_counter() - t_eval  # keep eval time out of the next tokens_per_sec
      if harness is not None and step % cfg.train.harness_every == 0:
        jax.block_until_ready(state)
        t_harness = time.perf_counter()
        writer.write(step, harness(state["params"], step))  # {} on processes other than 0, which only follow
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
