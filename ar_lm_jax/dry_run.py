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

`--target=v5p-16` (any slice in `tpu_topology.SLICES`; needs libtpu) compiles the train
step and the eval step for that TPU slice instead, on whatever host runs it, with the
XLA:TPU compiler and its memory model, and checks the per-chip peak against the HBM
the compiler says a chip offers (docs/tpu.md).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax

from ar_lm_jax import attention as attention_lib
from ar_lm_jax import aot, sharding, tpu_topology
from ar_lm_jax import step as step_lib
from ar_lm_jax.config import Config
from ar_lm_jax.distributed import say as _say
from ar_lm_jax.model import param_count

GB = 1e9


def _gb(n: float) -> str:
  return f"{n / GB:.2f} GB"


def _memory(compiled: aot.Compiled) -> Optional[dict[str, Any]]:
  """The report's memory entry: XLA's analysis with the compile time, or None where the compiler gives none."""
  if compiled.memory is None:
    return None
  return {**compiled.memory, "compile_s": round(compiled.compile_s, 2)}


def _compiler_peak(mem: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
  """For XLA:TPU: the peak is the compiler's peak_memory_in_bytes; arguments + outputs + temporaries stay as `sum_estimate`.

  On v5litepod-16 the FSDP recipe's temp_size is 15.01 GiB, its peak_memory 11.05 GiB, and its
  buffer assignment (args 1.15 GiB + one 10.38 GiB temp allocation) 11.53 GiB; it still compiles
  with libtpu's HBM capped at 12 GiB (--xla_tpu_max_hbm_size_mib=12288), so the 16.17 GiB sum
  is not what a chip holds at once.
  """
  if mem is None or mem.get("out_of_memory") or not mem.get("compiler_peak"):
    return mem
  mem["sum_estimate"] = mem["peak_estimate"]
  mem["peak_estimate"] = mem["compiler_peak"]
  return mem


def _out_of_memory(e: aot.OutOfMemory) -> dict[str, Any]:
  """XLA:TPU refuses at compile time a program that exceeds HBM, naming the bytes it needed: that is the peak."""
  return {"peak_estimate": e.peak_bytes, "out_of_memory": True, "compiler_hbm": e.hbm_bytes,
          "compile_s": round(e.compile_s, 2)}


def compile_train_step(setup: step_lib.Setup) -> tuple[Optional[aot.Compiled], Optional[dict[str, Any]], str]:
  """(compiled step or None, XLA's per-device memory analysis or None, why not) for the train step."""
  cfg = setup.cfg
  platform = setup.mesh.devices.flat[0].platform
  impl = attention_lib.resolve_attention(cfg.model, platform)
  if attention_lib.KERNEL_PLATFORM.get(impl, platform) != platform:
    return None, None, f"model.attention={impl} compiles only on {attention_lib.KERNEL_PLATFORM[impl].upper()}, not {platform}"
  with setup.activate():
    try:
      compiled = aot.compile_fn(step_lib.jit_train_step(setup), setup.abstract_state, step_lib.abstract_batch(cfg))
    except aot.OutOfMemory as e:
      return None, _out_of_memory(e), ""
    except jax.errors.JaxRuntimeError as e:  # e.g. a compiler that rejects the program on this backend
      return None, None, f"compilation failed on {platform}: {str(e).splitlines()[0]}"
  mem = _memory(compiled)
  return compiled, mem, "" if mem else f"the {platform} compiler gives no memory analysis"


def compiled_memory(setup: step_lib.Setup) -> tuple[Optional[dict[str, Any]], str]:
  """XLA's per-device memory analysis of the compiled train step, or (None, why not)."""
  compiled, mem, why = compile_train_step(setup)
  if compiled is None:
    return None, why or f"the compiler ran out of device memory: the step needs {_gb(mem['peak_estimate'])}"
  mem["collectives"] = compiled.collectives  # moved to the report's top level by dry_run
  return mem, why


def _device_bytes_limit() -> Optional[int]:
  stats = jax.local_devices()[0].memory_stats()  # None on CPU
  return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def dry_run(cfg: Config, *, memory_analysis: bool = True, target: Optional[str] = None) -> dict[str, Any]:
  """Builds `cfg` abstractly on this process's devices (or a TPU slice's) and prints what one device would hold.

  Returns a JSON-able report with at least `params`, `mesh` (axis -> size),
  `param_bytes_per_device` and `opt_state_bytes_per_device`; with `memory_analysis`,
  also `memory` (XLA's numbers for the compiled train step, per device) and
  `collective_bytes_per_device` ({op: operand bytes per device per step}, from the
  compiled HLO: `collectives.py`), or `memory_unavailable` (why not). With `target`
  (a Cloud TPU slice name), the steps are compiled for that slice and the report has
  the fields of `target_report`.
  """
  tpu = tpu_topology.lookup(target) if target else None
  if tpu and cfg.model.attention == "auto" and attention_lib.resolve_attention(cfg.model, "tpu") == "splash":
    # config.py checks splash's blocks against seq_len for an explicit splash only; `auto` becomes splash
    # here, so run the same check now: a ConfigError (exit 2) instead of a ValueError deep in the trace.
    cfg.replace(model=dataclasses.replace(cfg.model, attention="splash"))
  setup = step_lib.build(cfg, tpu_topology.devices(tpu) if tpu else None)
  abstract, shardings = setup.abstract_state, setup.state_shardings
  mesh = {str(k): int(v) for k, v in setup.mesh.shape.items()}
  devices = setup.mesh.devices.size
  n_params = param_count(abstract.params)
  param_bytes = sharding.bytes_per_device(abstract.params, shardings.params)
  opt_bytes = sharding.bytes_per_device(abstract.opt_state, shardings.opt_state)
  opt_total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract.opt_state))
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
      # The kernel the config selects where it will run: a CPU dry run stands in for a GPU launch.
      "attention": attention_lib.resolve_attention(cfg.model, "tpu" if setup.mesh.devices.flat[0].platform == "tpu" else "gpu"),
  }
  layout = "ZeRO-1: optimizer state also over data" if cfg.mesh.shard_optimizer_over_data else "optimizer state replicated over data"
  if cfg.mesh.fsdp:
    layout = "FSDP: parameters and optimizer state over data"
  if tpu:
    _say(f"dry run of {cfg.name} for {tpu.name}: {devices} {tpu.chip.device_kind} chips ({tpu.topology_name}) on {tpu.hosts} "
         f"host(s), compiled on this host by XLA:TPU")
  else:
    _say(f"dry run of {cfg.name} on {devices} {report['platform']} devices, {jax.process_count()} process(es)")
  _say(f"mesh: data={mesh[sharding.DATA]} x model={mesh[sharding.MODEL]} ({layout})")
  _say(f"parameters: {n_params:,}")
  _say(f"per device: parameters {_gb(param_bytes)}, optimizer state {_gb(opt_bytes)} (of {_gb(opt_total)} in all)")
  _say(f"batch: {cfg.data.batch_size} x {cfg.data.seq_len} = {report['tokens_per_step']:,} tokens per step; "
       f"{report['sequences_per_data_replica']} sequences per data replica per micro-batch, "
       f"{cfg.optim.grad_accum_steps} micro-batch(es) per step")
  if tpu:
    report.update(target_report(setup, tpu))
    return report
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


# ---------------------------------------------------------------------------
# --target: the steps compiled for a TPU slice.


def _gib(n: float) -> str:
  return f"{n / tpu_topology.GiB:.2f} GiB"


def compile_eval_step(setup: step_lib.Setup) -> tuple[Optional[dict[str, Any]], str]:
  """Memory of the in-training eval step (`evaluate.Scorer`, compiled as TrainEvaluator compiles it), or (None, why not)."""
  from ar_lm_jax import evaluate
  cfg = setup.cfg
  try:
    scorer = evaluate.Scorer(setup, cfg.data.batch_size // cfg.optim.grad_accum_steps)
  except aot.OutOfMemory as e:
    return _out_of_memory(e), ""
  except jax.errors.JaxRuntimeError as e:
    return None, f"compilation failed: {str(e).splitlines()[0]}"
  mem = _memory(scorer.compiled)
  return mem, "" if mem else "the compiler gives no memory analysis"


def mosaic_kernels(compiled) -> int:
  """Pallas TPU (Mosaic) kernel launches in the compiled program: the proof that a Pallas attention lowered."""
  return compiled.as_text().count('custom_call_target="tpu_custom_call"')


def target_report(setup: step_lib.Setup, tpu: tpu_topology.TpuSlice) -> dict[str, Any]:
  """Compiles the train and eval steps for `tpu`'s chips and checks each one's per-chip peak against HBM."""
  cfg = setup.cfg
  chip0 = setup.mesh.devices.flat[0]
  hbm = tpu_topology.compiler_hbm_bytes(chip0)
  hbm_source = "XLA:TPU compiler"
  if hbm is None:
    hbm, hbm_source = tpu.chip.hbm_bytes, "data sheet"
  _say(f"HBM per chip: {_gib(hbm)} ({hbm_source}); peak bf16 {tpu.chip.peak_bf16_flops / 1e12:.0f} TFLOP/s per chip")
  report: dict[str, Any] = {"target": tpu.name, "topology": tpu.topology_name, "hosts": tpu.hosts,
                            "hbm_bytes_per_device": hbm, "hbm_source": hbm_source}
  compiled, mem, why = compile_train_step(setup)
  mem = _compiler_peak(mem)
  report["memory"] = mem
  if mem is None:
    report["memory_unavailable"] = why
    _say(f"train step: {why}")
  elif mem.get("out_of_memory"):
    _say(f"train step: XLA:TPU refused it in {mem['compile_s']:.1f}s: needs {_gib(mem['peak_estimate'])} per chip, "
         f"HBM {_gib(mem['compiler_hbm'])}")
  else:
    _say(f"train step compiled in {mem['compile_s']:.1f}s; per chip: arguments {_gib(mem['argument'])}, "
         f"outputs {_gib(mem['output'])} ({_gib(mem['alias'])} of them donated), temporaries {_gib(mem['temp'])}, "
         f"peak {_gib(mem['peak_estimate'])} of {_gib(hbm)}"
         + (f" (the compiler's peak; arguments + temporaries {_gib(mem['sum_estimate'])})" if "sum_estimate" in mem else ""))
    if mem["peak_estimate"] > hbm:  # XLA:TPU's own check passed, yet its peak exceeds HBM
      _say(f"  the compiler accepted it, but its peak exceeds HBM by {_gib(mem['peak_estimate'] - hbm)}")
  eval_mem, eval_why = compile_eval_step(setup) if mem is not None else (None, "not compiled: the train step did not compile")
  eval_mem = _compiler_peak(eval_mem)
  report["eval_memory"] = eval_mem
  if eval_mem is None:
    report["eval_memory_unavailable"] = eval_why
    _say(f"eval step: {eval_why}")
  elif eval_mem.get("out_of_memory"):
    _say(f"eval step: XLA:TPU refused it: needs {_gib(eval_mem['peak_estimate'])} per chip")
  else:
    _say(f"eval step ({cfg.data.batch_size // cfg.optim.grad_accum_steps} rows) compiled in {eval_mem['compile_s']:.1f}s; "
         f"peak {_gib(eval_mem['peak_estimate'])} per chip")
  peaks = [m["peak_estimate"] for m in (mem, eval_mem) if m is not None]
  report["peak_bytes_per_device"] = mem["peak_estimate"] if mem else None
  report["eval_peak_bytes_per_device"] = eval_mem["peak_estimate"] if eval_mem else None
  report["compile_s"] = {"train": mem["compile_s"] if mem else None, "eval": eval_mem["compile_s"] if eval_mem else None}
  report["fits"] = bool(mem and eval_mem) and all(p <= hbm for p in peaks) and not any(
      m.get("out_of_memory") for m in (mem, eval_mem))
  report["collective_bytes_per_device"] = None
  if compiled is not None:
    coll = compiled.collectives
    report["collective_bytes_per_device"] = coll.bytes_per_device
    _say(coll.summary())
  kernels = mosaic_kernels(compiled.compiled) if compiled is not None else None
  report["attention"] = attention_lib.resolve_attention(cfg.model, "tpu")
  report["mosaic_kernels_in_train_step"] = kernels
  if kernels is not None:
    _say(f"attention: {report['attention']} (model.attention={cfg.model.attention}); {kernels} Pallas/Mosaic kernel "
         f"call(s) in the compiled train step")
  _say(f"the train and eval steps {'fit' if report['fits'] else 'do NOT fit'} on {tpu.name}")
  return report


def verdict_line(report: dict[str, Any]) -> str:
  """The one line a failed --target check ends with on stderr."""
  target, hbm = report["target"], report["hbm_bytes_per_device"]
  for step, key in (("", "memory"), ("eval step ", "eval_memory")):
    mem = report.get(key)
    if mem is None:
      return f"could not compile the {step or 'train step '}for {target}: {report.get(key + '_unavailable', '')}"
    if mem.get("out_of_memory") or mem["peak_estimate"] > hbm:
      return f"does not fit: {step}peak {_gib(mem['peak_estimate'])} > HBM {_gib(hbm)} per chip on {target}"
  return f"fits on {target}"
