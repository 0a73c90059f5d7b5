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
from ar_lm_jax import perf, sharding
from ar_lm_jax import train as train_lib
from ar_lm_jax.checkpoint import Checkpointer
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
  data_iter = data_lib.make_train_iterator(cfg.data, seed=cfg.train.seed, process_index=jax.process_index(),
                                           process_count=jax.process_count())
  latest = ckpt.latest_step()
  if latest is not None:
    state, data_state = ckpt.restore(latest, setup.abstract_state, setup.state_shardings)
    if data_state is not None:
      data_iter.set_state(data_state)
    _say(f"resuming from checkpoint step {latest} in {ckpt.directory}")
  else:
    state = train_lib.init_state(setup, cfg.train.seed)
  start_step = int(jax.device_get(state["step"]))

  step_fn = train_lib.jit_train_step(setup)
  with setup.activate():
    t0 = time.perf_counter()
    compiled = step_fn.lower(setup.abstract_state, train_lib.abstract_batch(cfg)).compile()
    compile_s = time.perf_counter() - t0
  _say(f"train step compiled in {compile_s:.1f}s")

  writer = MetricsWriter(workdir, enabled=is_main, total_steps=cfg.train.steps, progress=cfg.train.progress)
  writer.start_at(start_step)
  tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
  flops_per_token = perf.model_flops_per_token(cfg.model, cfg.data.seq_len)
  peak = perf.peak_flops_per_device()
  first_loss = last_loss = None
  pending: Optional[tuple[int, dict]] = None
  t_last, step_last = time.perf_counter(), start_step

  def report(step: int, metrics: dict) -> None:
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
    if peak:
      row["mfu"] = tps * flops_per_token / (peak * jax.device_count())
    row.update(data_iter.stats())
    writer.write(step, row)
    writer.progress(step, loss, tps)

  step = start_step
  for step in range(start_step + 1, cfg.train.steps + 1):
    batch = sharding.global_batch(next(data_iter), setup.mesh)
    state, metrics = compiled(state, batch)
    if pending is not None:
      report(*pending)
      pending = None
    if step % cfg.train.log_every == 0 or step == cfg.train.steps:
      pending = (step, metrics)
  if pending is not None:
    report(*pending)

  ckpt.save(int(jax.device_get(state["step"])), state, data_iter.get_state(), force=True)
  ckpt.wait()
  ckpt.close()
  writer.close()
  summary = {"workdir": str(workdir), "metrics": str(workdir / "metrics.jsonl"),
             "checkpoints": str(ckpt.directory), "steps": step, "first_loss": first_loss, "last_loss": last_loss,
             "compile_s": compile_s}
  return summary
