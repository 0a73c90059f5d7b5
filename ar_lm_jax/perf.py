"""Performance: model FLOPs per token, peak device FLOP/s (for MFU), XLA flags, and the train-step benchmark.

`benchmark(cfg, steps)` is what `python -m experiments.benchmark` runs: it
compiles the real train step ahead of time, times it on a synthetic packed
batch and, with `compare_torch`, alternates with the transformers baseline of
`hf_baseline.py` in the same process so both see the same machine load.
"""

from __future__ import annotations

import functools
import os
import resource
import statistics
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ar_lm_jax.config import Config, ConfigError, ModelConfig

# Dense bf16 peak FLOP/s per chip (vendor data sheets, without sparsity).
PEAK_FLOPS = {
    "h100": 989e12,
    "h200": 989e12,
    "h800": 989e12,
    "a100": 312e12,
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,
    "tpu v5e": 197e12,
    "tpu v5p": 459e12,
    "tpu v5": 459e12,
    "tpu v6 lite": 918e12,
}


def model_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Forward + backward FLOPs per token: 6 x (params without the input embedding) + causal attention counted once."""
  D, F, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.vocab_size
  per_layer = 4 * D * D + 3 * D * F  # q, k, v, o and the three MLP matrices (biases and norms are negligible)
  matmul_params = L * per_layer + D * V  # + LM head; the input embedding is a gather, not a matmul
  attention = 6 * L * seq_len * D  # QK^T and AV: 2 x 2 x T x D per token forward, halved by causality, x3 for backward
  return 6 * matmul_params + attention


def peak_flops_per_device() -> Optional[float]:
  """Peak FLOP/s of one device: the data-sheet value on GPU/TPU, a measured fp32 matmul rate on CPU."""
  dev = jax.devices()[0]
  if dev.platform == "cpu":
    return measured_cpu_matmul_flops()
  return peak_flops_for_kind(dev.device_kind)


def peak_flops_for_kind(device_kind: str) -> Optional[float]:
  """Data-sheet peak of a device by its jax device_kind ("NVIDIA H100 80GB HBM3", "TPU v5 lite", ...); None if unknown.

  The longest matching name wins, so "TPU v5 lite" (v5e) is not taken for "TPU v5" (v5p).
  """
  kind = device_kind.lower()
  for name, flops in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
    if name in kind:
      return flops
  return None


@functools.lru_cache(maxsize=None)
def measured_cpu_matmul_flops(n: int = 1024, repeats: int = 5) -> float:
  """The best rate of an n x n x n fp32 matmul on this CPU (all cores), in FLOP/s."""
  return _matmul_probe(n)(repeats)


def _matmul_probe(n: int) -> Callable[[int], float]:
  """A compiled n^3 fp32 matmul; calling it with `repeats` returns its best rate in FLOP/s."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()

  def rate(repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
      t = time.perf_counter()
      f(a).block_until_ready()
      best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best

  return rate


# ---------------------------------------------------------------------------
# XLA flags.

# Set on GPU only, before the backend starts (XLA reads XLA_FLAGS once). The set MaxText and
# NVIDIA's JAX-Toolbox recommend for transformer training on H100; docs/performance.md says why
# each one is there.
GPU_XLA_FLAGS = (
    "--xla_gpu_enable_latency_hiding_scheduler=true",  # schedule async collectives/copies to overlap compute
    "--xla_gpu_enable_triton_gemm=false",  # cuBLAS(Lt) for the dense GEMMs; Triton GEMM autotuning costs compile time for no gain
    "--xla_gpu_enable_highest_priority_async_stream=true",  # collectives never queue behind compute kernels
    "--xla_gpu_all_reduce_combine_threshold_bytes=134217728",  # fewer, larger gradient all-reduces (data parallel)
    "--xla_gpu_all_gather_combine_threshold_bytes=134217728",  # fewer, larger parameter all-gathers (FSDP)
    "--xla_gpu_reduce_scatter_combine_threshold_bytes=67108864",  # fewer, larger reduce-scatters (ZeRO / FSDP)
    "--xla_gpu_enable_pipelined_all_gather=true",  # prefetch the next scanned layer's weights during this one
    "--xla_gpu_enable_pipelined_reduce_scatter=true",  # and push its gradients out during the next
    "--xla_gpu_enable_pipelined_all_reduce=true",
    "--xla_gpu_enable_while_loop_double_buffering=true",  # lets the scan over layers overlap iterations' transfers
)


def gpu_present() -> bool:
  """Whether a CUDA device is visible, decided without starting a JAX backend."""
  if os.environ.get("JAX_PLATFORMS", "").strip().lower() in ("cpu", "tpu"):
    return False
  if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
    return False
  return os.path.exists("/dev/nvidiactl") or os.path.exists("/proc/driver/nvidia/version")


def gpu_xla_flags() -> tuple[str, ...]:
  return GPU_XLA_FLAGS


def apply_gpu_xla_flags() -> list[str]:
  """Adds GPU_XLA_FLAGS to XLA_FLAGS when a GPU is present; flags the user already set win.

  Must run before JAX starts its backend: entry points call it first thing.
  Returns the flags added.
  """
  if not gpu_present():
    return []
  current = os.environ.get("XLA_FLAGS", "")
  have = {f.split("=")[0] for f in current.split()}
  added = [f for f in gpu_xla_flags() if f.split("=")[0] not in have]
  if added:
    os.environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
  return added


# ---------------------------------------------------------------------------
# The train-step benchmark.


def synthetic_batch(batch_size: int, seq_len: int, vocab: int, seed: int = 0, mean_doc_len: int = 0) -> dict[str, np.ndarray]:
  """A packed batch like the data pipeline's: documents of random length back to back, positions restarting.

  Token ids are uniform over `vocab`, so nothing about the step's cost depends on text.
  """
  rng = np.random.default_rng(seed)
  mean_doc_len = mean_doc_len or max(seq_len // 4, 1)
  tokens = rng.integers(0, vocab, (batch_size, seq_len), dtype=np.int32)
  segment_ids = np.zeros((batch_size, seq_len), np.int32)
  positions = np.zeros((batch_size, seq_len), np.int32)
  for b in range(batch_size):
    t, seg = 0, 1
    while t < seq_len:
      n = min(int(rng.geometric(1.0 / mean_doc_len)), seq_len - t)
      segment_ids[b, t:t + n] = seg
      positions[b, t:t + n] = np.arange(n)
      t, seg = t + n, seg + 1
  return {"tokens": tokens, "segment_ids": segment_ids, "positions": positions,
          "loss_mask": np.ones((batch_size, seq_len), np.int32)}


def _cpu_seconds() -> float:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def memory_summary(compiled) -> dict[str, int]:
  """The compiled step's memory_analysis() as plain ints (bytes); empty where the backend gives none."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 - some backends do not implement it
    return {}
  if m is None:
    return {}
  keys = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
          "generated_code_size_in_bytes")
  return {k: int(getattr(m, k)) for k in keys if hasattr(m, k)}


def benchmark(cfg: Config, steps: int = 5, warmup: int = 2, compare_torch: bool = False, torch_adamw: str = "default",
              say: Callable[[str], None] = print) -> dict[str, Any]:
  """Compiles the train step ahead of time, times `steps` steps after `warmup`, and reports tokens/s and MFU.

  Timed steps run in blocks of one, each followed on CPU by a probe of the
  matmul rate and, with `compare_torch`, one step of the PyTorch baseline, so
  that every number is measured under the same machine load. Step times are
  medians over the timed steps.
  """
  from ar_lm_jax import sharding
  from ar_lm_jax import step as step_lib

  if steps < 1 or warmup < 0:
    raise ConfigError(f"--steps must be >= 1 and --warmup >= 0, got {steps} and {warmup}")
  if jax.process_count() > 1:
    raise ConfigError("the benchmark runs in a single process")
  if compare_torch and cfg.model.dtype != "float32":
    raise ConfigError("--compare_torch: the torch baseline runs fp32 only; set model.dtype=float32")
  setup = step_lib.build(cfg)
  platform = jax.devices()[0].platform
  B, T = cfg.data.batch_size, cfg.data.seq_len
  batch_np = synthetic_batch(B, T, min(cfg.model.vocab_size, 100289), seed=cfg.train.seed)
  say(f"{cfg.name}: {B} x {T} tokens per step, mesh {dict(setup.mesh.shape)} on {jax.device_count()} {platform} "
      f"device(s) ({jax.devices()[0].device_kind})")

  with setup.activate():
    t0 = time.perf_counter()
    lowered = step_lib.jit_train_step(setup).lower(setup.abstract_state, step_lib.abstract_batch(cfg))
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
  mem = memory_summary(compiled)
  say(f"compiled in {compile_s:.1f}s; memory_analysis: " +
      (", ".join(f"{k.replace('_size_in_bytes', '')} {v / 2**20:,.1f} MiB" for k, v in mem.items()) or "n/a"))
  from ar_lm_jax.collectives import collective_report
  coll = collective_report(compiled)
  say(coll.summary())

  state = step_lib.init_state(setup, cfg.train.seed)
  batch = sharding.global_batch(batch_np, setup.mesh)
  probe = _matmul_probe(2048) if platform == "cpu" else None
  baseline = None
  if compare_torch:
    from ar_lm_jax.hf_baseline import TorchBaseline
    threads = len(os.sched_getaffinity(0)) if platform == "cpu" else 1  # the cores XLA:CPU's thread pool uses
    baseline = TorchBaseline(cfg, batch_np, threads=threads, adamw=torch_adamw, seed=cfg.train.seed)
    say(f"torch baseline: transformers StableLmForCausalLM + torch.optim.AdamW ({torch_adamw}), {threads} threads")

  for _ in range(warmup):
    state, metrics = compiled(state, batch)
    jax.block_until_ready(state)
    if baseline is not None:
      baseline.step()
  ours, ours_cpu, theirs, rates = [], [], [], []
  for i in range(steps):
    t, c = time.perf_counter(), _cpu_seconds()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(state)
    ours.append(time.perf_counter() - t)
    ours_cpu.append(_cpu_seconds() - c)
    if probe is not None:
      rates.append(probe(3))
    if baseline is not None:
      theirs.append(baseline.timed_step())
    say(f"step {i + 1}/{steps}: ours {ours[-1]:.3f}s" + (f", torch {theirs[-1]:.3f}s" if theirs else "") +
        (f", matmul {rates[-1] / 1e9:.1f} GFLOP/s" if rates else ""))
  loss = float(jax.device_get(metrics["loss"]))

  step_time = statistics.median(ours)
  tokens_per_sec = B * T / step_time
  flops_per_token = model_flops_per_token(cfg.model, T)
  peak = statistics.median(rates) if rates else peak_flops_per_device()
  result: dict[str, Any] = {
      "config": cfg.name,
      "device": jax.devices()[0].device_kind,
      "num_devices": jax.device_count(),
      "steps": steps,
      "loss": loss,
      "tokens_per_sec": tokens_per_sec,
      "step_time_s": step_time,
      "step_time_min_s": min(ours),
      "step_cpu_s": statistics.median(ours_cpu),  # CPU seconds of all threads: steadier than wall time on a shared host
      "compile_s": compile_s,
      "model_flops_per_token": flops_per_token,
      "peak_flops": peak,
      "peak_flops_source": "measured 2048^3 fp32 matmul, median over the run" if rates else "data sheet, dense bf16",
      "mfu": tokens_per_sec * flops_per_token / (peak * jax.device_count()) if peak else None,
      "memory": mem,
      "collective_bytes_per_device": coll.bytes_per_device,  # operand bytes per device per step, from the HLO
  }
  if baseline is not None:
    torch_step = statistics.median(theirs)
    result.update({"torch_tokens_per_sec": B * T / torch_step, "torch_step_time_s": torch_step,
                   "torch_adamw": torch_adamw, "speedup": torch_step / step_time})
  return result


# ---------------------------------------------------------------------------
# Where the time goes.


def _thunk_ops(hlo_text: str) -> dict[str, str]:
  """Instruction name -> the JAX op path in its metadata, from a compiled module's text."""
  ops = {}
  for line in hlo_text.splitlines():
    line = line.strip()
    if line.startswith("ROOT "):
      line = line[5:]
    if not line.startswith("%") or "op_name=\"" not in line:
      continue
    name = line[1:line.index(" ")]
    ops[name] = line.split("op_name=\"", 1)[1].split("\"", 1)[0]
  return ops


def step_part(op_path: str) -> str:
  """A coarse part of the train step for a JAX op path."""
  if any(eq in op_path for eq in ("btd,dv->btv", "bcv,dv->bcd", "bcd,bcv->dv")) or (
      "while/body/closed_call" in op_path and "layers" not in op_path):
    return "LM head + cross-entropy"
  if "embed_tokens" in op_path:
    return "embedding"
  if "layers" in op_path:
    return "decoder blocks"
  if "jvp(" in op_path or "transpose(" in op_path:
    return "other forward/backward"
  return "optimizer, clipping, state update"


def profile_step(cfg: Config, reps: int = 3) -> tuple[list[dict[str, Any]], float]:
  """Per-op wall time of the compiled train step from a jax.profiler trace: (rows, mean step seconds).

  Rows are sorted by total time: op (the XLA thunk), jax op path, part, ms per step, calls per step.
  Thunks that XLA runs concurrently overlap, so the ms can add up to more than the step.
  """
  import collections
  import glob
  import gzip
  import json
  import shutil
  import tempfile

  from ar_lm_jax import sharding
  from ar_lm_jax import step as step_lib

  setup = step_lib.build(cfg)
  with setup.activate():
    compiled = step_lib.jit_train_step(setup).lower(setup.abstract_state, step_lib.abstract_batch(cfg)).compile()
  ops = _thunk_ops(compiled.as_text())
  state = step_lib.init_state(setup, cfg.train.seed)
  batch = sharding.global_batch(synthetic_batch(cfg.data.batch_size, cfg.data.seq_len, min(cfg.model.vocab_size, 100289)),
                                setup.mesh)
  state, _ = compiled(state, batch)
  jax.block_until_ready(state)
  tmp = tempfile.mkdtemp()
  try:
    t = time.perf_counter()
    with jax.profiler.trace(tmp):
      for _ in range(reps):
        state, _ = compiled(state, batch)
        jax.block_until_ready(state)
    step_s = (time.perf_counter() - t) / reps
    traces = glob.glob(f"{tmp}/**/*.trace.json.gz", recursive=True)
    events = json.load(gzip.open(traces[0]))["traceEvents"] if traces else []
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  total, calls = collections.Counter(), collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e.get("name") in ops:
      total[e["name"]] += e["dur"]
      calls[e["name"]] += 1
  rows = [{"op": n, "jax_op": ops[n], "part": step_part(ops[n]), "ms": us / 1e3 / reps, "calls": calls[n] // reps}
          for n, us in total.most_common()]
  return rows, step_s
