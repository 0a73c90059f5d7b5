"""The one ahead-of-time compile path: compile time, XLA's memory analysis with the peak estimate, the collective
report on demand, and XLA:TPU's compile-time out-of-memory turned into the bytes it needed."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ar_lm_jax import aot, collectives


@functools.partial(jax.jit, donate_argnums=0)
def _update(x_N, y_N):
  return x_N + 2 * y_N, jnp.sum(x_N * y_N)


def test_compile_fn_times_the_compile_reads_memory_and_runs_the_compiled_function():
  x = jax.ShapeDtypeStruct((1024,), jnp.float32)
  c = aot.compile_fn(_update, x, x)
  assert isinstance(c.compiled, jax.stages.Compiled) and c.compile_s > 0
  m = c.memory
  assert set(m) == {*aot.MEMORY_KINDS, "peak_estimate", "compiler_peak"} and all(isinstance(v, int) for v in m.values())
  assert m["argument"] >= 2 * 4096 and m["output"] >= 4096
  # Donated inputs are aliased to the outputs: counted once.
  assert m["peak_estimate"] == m["argument"] + m["output"] - m["alias"] + m["temp"]
  new_x, dot = c(jnp.ones(1024), jnp.full(1024, 3.0))
  np.testing.assert_allclose(np.asarray(new_x), 7.0)
  assert float(dot) == 3 * 1024


def test_collective_report_is_computed_on_first_use_and_kept():
  x = jax.ShapeDtypeStruct((8,), jnp.float32)
  c = aot.compile_fn(_update, x, x)
  assert "collectives" not in vars(c)  # compiling alone never walks the HLO text
  report = c.collectives
  assert c.collectives is report
  assert report.bytes_per_device == collectives.collective_report(c.compiled).bytes_per_device
  assert report.bytes_per_device == dict.fromkeys(collectives.KINDS, 0)  # one device: nothing to send


class _Refusing:
  """A jitted function whose compile fails with `message`, as XLA:TPU's does for a program over HBM."""

  def __init__(self, message: str):
    self.message = message

  def lower(self, *args, **kwargs):
    return self

  def compile(self):
    raise jax.errors.JaxRuntimeError(self.message)


def test_tpu_out_of_memory_at_compile_time_names_the_peak_and_other_errors_pass_through():
  with pytest.raises(aot.OutOfMemory) as got:
    aot.compile_fn(_Refusing("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
                             "temporaries (39.65G) exceeds available HBM (15.75G)."))
  e = got.value
  assert (e.peak_bytes, e.hbm_bytes) == (int(39.65 * 2**30), int(15.75 * 2**30)) and e.compile_s >= 0
  assert isinstance(e.__cause__, jax.errors.JaxRuntimeError) and "39.65G" in str(e)
  with pytest.raises(jax.errors.JaxRuntimeError, match="Mosaic failed"):
    aot.compile_fn(_Refusing("INTERNAL: Mosaic failed to compile TPU kernel"))


@pytest.mark.parametrize("analysis", [lambda: None, lambda: (_ for _ in ()).throw(NotImplementedError("no analysis"))])
def test_memory_is_none_where_the_backend_gives_no_analysis(analysis):
  compiled = type("Compiled", (), {"memory_analysis": staticmethod(analysis)})()
  assert aot.memory_analysis(compiled) is None
