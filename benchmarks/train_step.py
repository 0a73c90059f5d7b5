"""The train-step benchmark that `python -m experiments.benchmark` runs.

`benchmark(cfg, steps)` compiles the real train step ahead of time (`aot.compile_fn`), times it
on a synthetic packed batch and, with `compare_torch`, alternates with the transformers baseline
of `torch_baseline.py` in the same process so both see the same machine load.
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from typing import Any, Callable

import jax
import numpy as np

from ar_lm_jax import aot, flops, sharding
from ar_lm_jax import attention as attention_lib
from ar_lm_jax import step as step_lib
from ar_lm_jax.config import Config, ConfigError
from benchmarks.torch_baseline import ADAMW_IMPLS


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


def check_args(cfg: Config, steps: int, warmup: int, compare_torch: bool, torch_adamw: str) -> None:
  """The benchmark's arguments, checked once, here: a ConfigError (exit 2, one line) names the bad one."""
  if steps < 1 or warmup < 0:
    raise ConfigError(f"--steps must be >= 1 and --warmup >= 0, got {steps} and {warmup}")
  if torch_adamw not in ADAMW_IMPLS:
    raise ConfigError(f"--torch_adamw: must be one of {ADAMW_IMPLS}, got {torch_adamw!r}")
  if compare_torch and cfg.model.dtype != "float32":
    raise ConfigError("--compare_torch: the torch baseline runs fp32 only; set model.dtype=float32")
  if jax.process_count() > 1:
    raise ConfigError("the benchmark runs in a single process")


def _cpu_seconds() -> float:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def _mib(mem: dict[str, int] | None) -> str:
  return ", ".join(f"{k} {v / 2**20:,.1f} MiB" for k, v in (mem or {}).items()) or "n/a"


def benchmark(cfg: Config, steps: int = 5, warmup: int = 2, compare_torch: bool = False, torch_adamw: str = "default",
              say: Callable[[str], None] = print) -> dict[str, Any]:
  """Compiles the train step ahead of time, times `steps` steps after `warmup`, and reports tokens/s and MFU.

  Timed steps run in blocks of one, each followed on CPU by a probe of the
  matmul rate and, with `compare_torch`, one step of the PyTorch baseline, so
  that every number is measured under the same machine load. Step times are
  medians over the timed steps.
  """
  check_args(cfg, steps, warmup, compare_torch, torch_adamw)
  setup = step_lib.build(cfg)
  platform = jax.devices()[0].platform
  B, T = cfg.data.batch_size, cfg.data.seq_len
  batch_np = synthetic_batch(B, T, min(cfg.model.vocab_size, 100289), seed=cfg.train.seed)
  say(f"{cfg.name}: {B} x {T} tokens per step, mesh {dict(setup.mesh.shape)} on {jax.device_count()} {platform} "
      f"device(s) ({jax.devices()[0].device_kind})")

  with setup.activate():
    compiled = aot.compile_fn(step_lib.jit_train_step(setup), setup.abstract_state, step_lib.abstract_batch(cfg))
  say(f"compiled in {compiled.compile_s:.1f}s; memory_analysis: {_mib(compiled.memory)}")
  coll = compiled.collectives
  say(coll.summary())

  state = step_lib.init_state(setup, cfg.train.seed)
  batch = sharding.global_batch(batch_np, setup.mesh)
  probe = flops.matmul_probe(2048) if platform == "cpu" else None
  baseline = None
  if compare_torch:
    from benchmarks.torch_baseline import TorchBaseline
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
  flops_per_token = flops.model_flops_per_token(cfg.model, T)
  peak = statistics.median(rates) if rates else flops.peak_flops_per_device()
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
      "compile_s": compiled.compile_s,
      "model_flops_per_token": flops_per_token,
      "peak_flops": peak,
      "peak_flops_source": "measured 2048^3 fp32 matmul, median over the run" if rates else "data sheet, dense bf16",
      "mfu": flops.mfu(tokens_per_sec, flops_per_token, peak, jax.device_count()),
      "memory": compiled.memory or {},
      "collective_bytes_per_device": coll.bytes_per_device,  # operand bytes per device per step, from the HLO
      "attention": attention_lib.resolve_attention(cfg.model, platform),  # the kernel that ran: never `auto`
  }
  if baseline is not None:
    torch_step = statistics.median(theirs)
    result.update({"torch_tokens_per_sec": B * T / torch_step, "torch_step_time_s": torch_step,
                   "torch_adamw": torch_adamw, "speedup": torch_step / step_time})
  return result
