"""What every test process shares: 8 fake CPU devices, rank promotion as an error, and a one-thread torch.

The mesh, loss, attention, collectives and checkpoint tests run in this process on `jax.devices()[:n]`
instead of in subprocesses with their own device counts; the 8 devices are fixed when the CPU backend
starts, so they are set here, before any test module touches JAX. Subprocesses that tests still start
(several processes, signals, exit codes, a fresh backend) get this process's environment as it was
before, so that each one sees the devices its test asks for and nothing more.
"""

from __future__ import annotations

import contextlib
import os
import sys

import pytest

DEVICES = 8
_ENV = {k: os.environ.get(k) for k in ("XLA_FLAGS", "JAX_PLATFORMS")}
# Appended, so flags the user set stay (a later duplicate of the device count wins in XLA's parser).
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={DEVICES}".strip()
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402 - after the environment above

jax.config.update("jax_platforms", "cpu")  # also when a plugin imported jax before this file read the env
# Shape names are enforced: an implicit [B, T] + [T] broadcast is an error in the tests (explicit x[None] is fine).
jax.config.update("jax_numpy_rank_promotion", "raise")
if jax.device_count() != DEVICES:  # starts the backend now, while the flags above are in the environment
  raise RuntimeError(f"expected {DEVICES} fake CPU devices, got {jax.devices()}: a JAX backend started before "
                     "tests/conftest.py could set XLA_FLAGS")
for _k, _v in _ENV.items():  # the backend has read them; subprocesses get the environment they had before
  if _v is None:
    os.environ.pop(_k, None)
  else:
    os.environ[_k] = _v


_REAL = {name: getattr(jax, name) for name in ("devices", "device_count", "local_devices", "local_device_count")}


@contextlib.contextmanager
def _visible(n: int):
  """The library sees only the first n devices (jax.devices(), jax.device_count() and the local ones), as a
  process started with n devices would: for code that takes every device it sees (loop.run, evaluate.load_run).
  Nests: an inner `_visible(8)` inside a one-device module sees 8 again."""
  devices, local = _REAL["devices"], _REAL["local_devices"]
  patched = {
      "devices": lambda backend=None: devices(backend)[:n],
      "device_count": lambda backend=None: len(devices(backend)[:n]),
      "local_devices": lambda process_index=None, backend=None, host_id=None: local(process_index, backend, host_id)[:n],
      "local_device_count": lambda backend=None: len(local(None, backend)[:n]),
  }
  saved = {name: getattr(jax, name) for name in patched}
  for name, fn in patched.items():
    setattr(jax, name, fn)
  try:
    yield devices()[:n]
  finally:
    for name, fn in saved.items():
      setattr(jax, name, fn)


def pytest_configure(config):
  config.addinivalue_line("markers", "devices(n): the test (or module, as pytestmark) means a process of n devices: "
                                     "the library sees jax.devices()[:n]")


@pytest.fixture(scope="session")
def visible_devices():
  """`with visible_devices(n) as devices:`, for fixtures of any scope (see _visible)."""
  return _visible


@pytest.fixture(scope="module", autouse=True)
def _devices_of_module(request):
  """A module marked `pytestmark = pytest.mark.devices(n)` sees n devices in its module fixtures too."""
  marker = request.node.get_closest_marker("devices")
  with contextlib.nullcontext() if marker is None else _visible(marker.args[0]):
    yield


@pytest.fixture(autouse=True)
def _devices_of_test(request):
  marker = request.node.get_closest_marker("devices")
  with contextlib.nullcontext() if marker is None else _visible(marker.args[0]):
    yield


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
  """torch's intra-op threads spin against XLA's on a 2-core machine (6x slower forwards); the test models are tiny.

  Only where a test module imported torch (collection is over when this runs): the other tests never pay for it."""
  torch = sys.modules.get("torch")
  if torch is None:
    yield
    return
  before = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(before)
