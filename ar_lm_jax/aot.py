"""Ahead-of-time compilation: one `compile_fn` that lowers and compiles a jitted function for abstract inputs.

Every compiled step goes through it (the loop's train step, the dry run, the benchmark and the
profiler, the held-out scorer, the harness's scoring functions), so all of them time the compile
and read XLA's memory analysis the same way, and the collective report is there for any of them.
Callers that need the logical-axis rules wrap the call in `setup.activate()`, as for `jit` itself.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Optional

import jax

from ar_lm_jax import collectives, tpu_topology

MEMORY_KINDS = ("argument", "output", "alias", "temp", "generated_code")


@dataclasses.dataclass(frozen=True)
class Compiled:
  """A compiled function with what compiling it told us; calling it calls the compiled function."""
  compiled: jax.stages.Compiled
  compile_s: float  # lowering and compiling, seconds
  # Per-device bytes by MEMORY_KINDS, plus peak_estimate and compiler_peak (the backend's own
  # peak_memory_in_bytes, 0 if it gives none); None where the backend gives no analysis.
  memory: Optional[dict[str, int]]

  def __call__(self, *args, **kwargs):
    return self.compiled(*args, **kwargs)

  @functools.cached_property
  def collectives(self) -> collectives.CollectiveReport:
    """Bytes per collective per step, read from the optimized HLO on first use: only callers that report it walk the text."""
    return collectives.collective_report(self.compiled)


class OutOfMemory(RuntimeError):
  """XLA:TPU refused the program at compile time because it exceeds HBM; the message names the bytes it needed."""

  def __init__(self, message: str, peak_bytes: int, hbm_bytes: int, compile_s: float):
    super().__init__(message)
    self.peak_bytes, self.hbm_bytes, self.compile_s = peak_bytes, hbm_bytes, compile_s


def compile_fn(jitted, *abstract_args, **abstract_kwargs) -> Compiled:
  """Lowers and compiles `jitted` (a `jax.jit` function) for abstract (or concrete) arguments.

  Raises OutOfMemory where XLA:TPU's RESOURCE_EXHAUSTED names the bytes needed (that is the
  program's peak, which the dry run reports); any other compile error propagates as JAX raised it.
  """
  t0 = time.perf_counter()
  lowered = jitted.lower(*abstract_args, **abstract_kwargs)
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    parsed = tpu_topology.parse_out_of_memory(str(e))
    if parsed is None:
      raise
    raise OutOfMemory(str(e), parsed[0], parsed[1], time.perf_counter() - t0) from e
  compile_s = time.perf_counter() - t0
  return Compiled(compiled, compile_s, memory_analysis(compiled))


def memory_analysis(compiled: Any) -> Optional[dict[str, int]]:
  """XLA's per-device memory analysis as plain ints (bytes), with the peak estimate; None where the backend gives none."""
  try:
    stats = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 - some backends do not implement it
    return None
  if stats is None:
    return None
  mem = {k: int(getattr(stats, f"{k}_size_in_bytes")) for k in MEMORY_KINDS}
  # Donated state is aliased to the output, so it is counted once.
  mem["peak_estimate"] = mem["argument"] + mem["output"] - mem["alias"] + mem["temp"]
  # The compiler's own peak of simultaneously live bytes (0 where a backend does not say). XLA:TPU's
  # temp_size is not that: it can exceed what is ever live at once by GiBs (docs/tpu.md), so a TPU
  # target's verdict uses this instead (dry_run._compiler_peak).
  mem["compiler_peak"] = int(getattr(stats, "peak_memory_in_bytes", 0) or 0)
  return mem
