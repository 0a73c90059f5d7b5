"""Check a launch before spending a GPU-hour: mesh, parameter count and bytes per device, from shapes alone.

`python -m experiments.train --config=ar_stablelm_2_1_6b --dry_run`, with
`XLA_FLAGS=--xla_force_host_platform_device_count=16` on a laptop, builds the
model and the optimizer state abstractly on the 16-device mesh of the real
launch (so the same validation runs: mesh size, heads, MLP width, batch), then
lowers and compiles the train step against abstract inputs and prints XLA's
memory analysis of it. No parameter, optimizer state or batch is ever allocated.

The compiled numbers come from whatever backend runs the dry run. On CPU they
are an estimate for GPU: the CPU compiler fuses and schedules differently, and
`cudnn` attention falls back to the XLA reference there, which materializes the
[B, N, T, T] scores, so CPU temporaries overstate a flash-attention GPU run.
"""

from __future__ import annotations

import time
from typing import Any, Optional

import jax

from ar_lm_jax import collectives, sharding
from ar_lm_jax import train as train_lib
from ar_lm_jax.config import Config
from ar_lm_jax.model import param_count

GB = 1e9


def _say(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


def _gb(n: float) -> str:
  return f"{n / GB:.2f} GB"


def compiled_memory(setup: train_lib.Setup) -> tuple[Optional[dict[str, Any]], str]:
  """XLA's per-device memory analysis of the compiled train step, or (None, why not)."""
  cfg = setup.cfg
  platform = setup.mesh.devices.flat[0].platform
  if cfg.model.attention == "pallas" and platform != "gpu":
    return None, f"model.attention=pallas compiles only on GPU, not {platform}"
  step = train_lib.jit_train_step(setup)
  t0 = time.perf_counter()
  with setup.activate():
    lowered = step.lower(setup.abstract_state, train_lib.abstract_batch(cfg))
    try:
      compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:  # e.g. a compiler that rejects the program on this backend
      return None, f"compilation failed on {platform}: {str(e).splitlines()[0]}"
  compile_s = time.perf_counter() - t0
  stats = compiled.memory_analysis()
  if stats is None:
    return None, f"the {platform} compiler gives no memory analysis"
  mem = {k: int(getattr(stats, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp", "generated_code")}
  # Donated state is aliased to the output, so it is counted once.
  mem["peak_estimate"] = mem["argument"] + mem["output"] - mem["alias"] + mem["temp"]
  mem["compile_s"] = round(compile_s, 2)
  mem["collectives"] = collectives.collective_report(compiled)  # moved to the report's top level by dry_run
  return mem, ""


def _device_bytes_limit() -> Optional[int]:
  stats = jax.local_devices()[0].memory_stats()  # None on CPU
  return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def dry_run(cfg: Config, *, memory_analysis: bool = True) -> dict[str, Any]:
  """Builds `cfg` abstractly on this process's devices and prints what one device would hold.

  Returns a JSON-able report with at least `params`, `mesh` (axis -> size),
  `param_bytes_per_device` and `opt_state_bytes_per_device`; with `memory_analysis`,
  also `memory` (XLA's numbers for the compiled train step, per device) and
  `collective_bytes_per_device` ({op: operand bytes per device per step}, from the
  compiled HLO: `collectives.py`), or `memory_unavailable` (why not).
  """
  setup = train_lib.build(cfg)
  abstract, shardings = setup.abstract_state, setup.state_shardings
  mesh = {str(k): int(v) for k, v in setup.mesh.shape.items()}
  devices = setup.mesh.devices.size
  n_params = param_count(abstract["params"])
  param_bytes = sharding.bytes_per_device(abstract["params"], shardings["params"])
  opt_bytes = sharding.bytes_per_device(abstract["opt_state"], shardings["opt_state"])
  opt_total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract["opt_state"]))
  micro = cfg.data.batch_size // cfg.optim.grad_accum_steps
  report: dict[str, Any] = {
      "config": cfg.name,
      "platform": setup.mesh.devices.flat[0].platform,
      "devices": devices,
      "processes": jax.process_count(),
      "mesh": mesh,
      "zero1": cfg.mesh.shard_optimizer_over_data,
      "fsdp": cfg.mesh.fsdp,
      "params": n_params,
      "param_bytes_per_device": param_bytes,
      "opt_state_bytes_per_device": opt_bytes,
      "global_batch": cfg.data.batch_size,
      "seq_len": cfg.data.seq_len,
      "grad_accum_steps": cfg.optim.grad_accum_steps,
      "sequences_per_data_replica": micro // mesh[sharding.DATA],
      "tokens_per_step": cfg.data.batch_size * cfg.data.seq_len,
  }
  layout = "ZeRO-1: optimizer state also over data" if cfg.mesh.shard_optimizer_over_data else "optimizer state replicated over data"
  if cfg.mesh.fsdp:
    layout = "FSDP: parameters and optimizer state over data"
  _say(f"dry run of {cfg.name} on {devices} {report['platform']} devices, {jax.process_count()} process(es)")
  _say(f"mesh: data={mesh[sharding.DATA]} x model={mesh[sharding.MODEL]} ({layout})")
  _say(f"parameters: {n_params:,}")
  _say(f"per device: parameters {_gb(param_bytes)}, optimizer state {_gb(opt_bytes)} (of {_gb(opt_total)} in all)")
  _say(f"batch: {cfg.data.batch_size} x {cfg.data.seq_len} = {report['tokens_per_step']:,} tokens per step; "
       f"{report['sequences_per_data_replica']} sequences per data replica per micro-batch, "
       f"{cfg.optim.grad_accum_steps} micro-batch(es) per step")
  if memory_analysis:
    mem, why = compiled_memory(setup)
    if mem is None:
      report["memory_unavailable"] = why
      _say(f"compiled memory analysis unavailable: {why}")
    else:
      coll = mem.pop("collectives")
      report["collective_bytes_per_device"] = coll.bytes_per_device
      report["memory"] = mem
      _say(coll.summary())
      _say(f"train step compiled in {mem['compile_s']:.1f}s; per device: arguments {_gb(mem['argument'])}, "
           f"outputs {_gb(mem['output'])} ({_gb(mem['alias'])} of them donated), temporaries {_gb(mem['temp'])}, "
           f"peak about {_gb(mem['peak_estimate'])}")
      limit = _device_bytes_limit()
      if limit:
        report["device_bytes_limit"] = limit
        verdict = "fits" if mem["peak_estimate"] <= limit else "does NOT fit"
        _say(f"device memory {_gb(limit)}: the step {verdict}")
      elif report["platform"] == "cpu":
        _say("(CPU compiler's estimate: see ar_lm_jax/dry_run.py for how it differs from a GPU run)")
  return report
