"""checkpoint.py: what a checkpoint holds and how it comes back.

The fingerprint against a numpy reference of its formula; restores compared bitwise with the
state that was saved; damaged and unfinished checkpoints (a flipped byte, a truncated chunk, a
missing item, broken JSON, a save killed half-way) moved aside with a warning naming the damage,
never deleted; the keep policy; runs that do not fit a checkpoint; a params-only checkpoint refused
for resume (its readers: test_saved_run.py); resharding 4x2 -> 8x1 and -> one device (on the
8 fake devices of conftest.py). The end-to-end runs (resume, SIGTERM, SIGKILL, NaN steps) are in
test_loop.py.
"""

import dataclasses
import gc
import json
import logging
import re
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ar_lm_jax import checkpoint as ckpt_lib
from ar_lm_jax import saved_run
from ar_lm_jax import step as step_lib
from ar_lm_jax.config import ConfigError, MeshConfig, load_config
import run_testing

REPO = Path(__file__).resolve().parents[1]


def small_config(**checkpoint):
  cfg = load_config("tiny")
  return cfg.replace(
      model=dataclasses.replace(cfg.model, vocab_size=512, hidden_size=32, num_heads=2, intermediate_size=64),
      data=dataclasses.replace(cfg.data, seq_len=32, batch_size=4),
      checkpoint=dataclasses.replace(cfg.checkpoint, **{"keep": 3, **checkpoint}))


def distinct(setup, state):
  """The state with every float leaf shifted by its element index, so no two leaves (or moments) are alike."""
  def shift(x):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      return x
    return x + jnp.arange(x.size, dtype=x.dtype).reshape(x.shape) * 1e-3
  return jax.jit(lambda s: jax.tree.map(shift, s), out_shardings=setup.state_shardings)(state)


@pytest.fixture(scope="module")
def small():
  cfg = small_config()
  setup = step_lib.build(cfg, devices=jax.devices()[:1])
  state = distinct(setup, step_lib.init_state(setup, 0))
  return cfg, setup, state, jax.device_get(state)


def variant(state, k):
  """The state plus k on every float leaf, so each saved step has its own values."""
  return jax.tree.map(lambda x: x + k if jnp.issubdtype(x.dtype, jnp.floating) else x, state)


def save_steps(directory, cfg, state, steps):
  ck = ckpt_lib.Checkpointer(directory, cfg)
  for s in steps:
    ck.save(s, variant(state, s), {"row": s})
  ck.close()


def assert_same_tree(a, b):
  pa, _ = jax.tree_util.tree_flatten_with_path(a)
  pb, _ = jax.tree_util.tree_flatten_with_path(b)
  assert [ckpt_lib.path_str(p) for p, _ in pa] == [ckpt_lib.path_str(p) for p, _ in pb]
  for (p, x), (_, y) in zip(pa, pb):
    x, y = np.atleast_1d(np.asarray(x)), np.atleast_1d(np.asarray(y))
    assert x.dtype == y.dtype and np.array_equal(x.view(np.uint8), y.view(np.uint8)), ckpt_lib.path_str(p)


# ---------------------------------------------------------------------------
# Fingerprints.


def numpy_fingerprint(x: np.ndarray) -> int:
  x = np.asarray(x)
  bits = x.astype(np.uint64) if x.dtype.itemsize == 1 else x.view(f"uint{8 * x.dtype.itemsize}").astype(np.uint64)
  index = np.arange(x.size, dtype=np.uint64).reshape(x.shape)
  weight = (index * np.uint64(0x9E3779B1) % np.uint64(2**32)) * np.uint64(2) % np.uint64(2**32) + np.uint64(1)
  return int(np.sum(bits * weight, dtype=np.uint64) % np.uint64(2**32))  # uint64 wraps mod 2**64, a multiple of 2**32


def test_fingerprint_matches_numpy_reference_and_sees_every_bit():
  rng = np.random.default_rng(0)
  tree = {"f32": rng.standard_normal((3, 5, 7)).astype(np.float32),
          "bf16": rng.standard_normal((4, 6)).astype(jnp.bfloat16),
          "i32": np.int32(-12345), "flag": np.array([True, False, True])}
  got = ckpt_lib.fingerprints(jax.device_put(tree))
  assert got == {k: numpy_fingerprint(v) for k, v in tree.items()}
  assert ckpt_lib.fingerprints(tree) == got  # host arrays take the CPU path, same sums
  x = tree["f32"]
  for flat_index, bit in [(0, 0), (52, 31), (104, 7)]:
    y = x.copy().reshape(-1).view(np.uint32)
    y[flat_index] ^= np.uint32(1 << bit)
    assert ckpt_lib.fingerprints({"f32": y.view(np.float32).reshape(x.shape)})["f32"] != got["f32"]
  swapped = x.copy()
  swapped[0, 0, [0, 1]] = swapped[0, 0, [1, 0]]
  assert ckpt_lib.fingerprints({"f32": swapped})["f32"] != got["f32"]  # position-weighted: a swap is seen too


# ---------------------------------------------------------------------------
# Restore, damage, fallback.


def largest_chunk(step_dir: Path) -> Path:
  return max((p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"),
             key=lambda p: p.stat().st_size)


def damage(step_dir: Path, kind: str) -> str:
  """Damages a finished checkpoint; returns a regex of what the warning must say."""
  if kind == "flip":  # most often reads back without any error from orbax, as other numbers
    f = largest_chunk(step_dir)
    b = bytearray(f.read_bytes())
    b[len(b) // 2] ^= 0x01
    f.write_bytes(bytes(b))
    return "differ from the fingerprint|cannot read its state"
  if kind == "mixed_copy":  # the arrays of another step (a copy gone wrong): orbax reads them without a murmur
    shutil.rmtree(step_dir / "state")
    shutil.copytree(step_dir.parent / "1" / "state", step_dir / "state")
    return "differ from the fingerprint"
  if kind == "truncate":
    f = largest_chunk(step_dir)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return r'cannot read its state arrays \(.*Error reading "(params|opt_state)[^"]+"'  # names the array
  if kind == "missing_item":
    for p in sorted((step_dir / "fingerprint").iterdir()):
      p.unlink()
    (step_dir / "fingerprint").rmdir()
    return r"fingerprint item\(s\) are missing"
  if kind == "bad_json":
    (step_dir / "config" / "metadata").write_text("{truncated")
    return r"cannot read config/metadata \(JSONDecodeError"
  raise ValueError(kind)


@pytest.mark.parametrize("kind", ["flip", "mixed_copy", "truncate", "missing_item", "bad_json"])
def test_damaged_latest_falls_back_to_the_previous_and_is_kept(small, tmp_path, capsys, kind):
  cfg, setup, state, host = small
  save_steps(tmp_path, cfg, state, [1, 2, 3])
  expected = damage(tmp_path / "3", kind)
  files_before = sorted(p.relative_to(tmp_path / "3") for p in (tmp_path / "3").rglob("*"))
  ck = ckpt_lib.Checkpointer(tmp_path, cfg)
  restored = ck.restore_latest(setup.abstract_state, setup.state_shardings)
  assert restored.step == 2 and restored.data_state == {"row": 2}
  assert_same_tree(restored.state, jax.device_get(variant(state, 2)))
  err = capsys.readouterr().err
  assert "checkpoint step 3" in err and re.search(expected, err) and "trying the previous one" in err
  assert len(err.strip().splitlines()) == 1, err  # one line per moved-aside step
  (moved,) = tmp_path.glob("3.corrupt-*")
  assert moved.name in err
  assert sorted(p.relative_to(moved) for p in moved.rglob("*")) == files_before  # kept whole, not deleted
  # The run goes on: step 3 can be saved again, and is the one restored next.
  ck.save(3, restored.state, {"row": 3})
  ck.close()
  again = ckpt_lib.Checkpointer(tmp_path, cfg).restore_latest(setup.abstract_state, setup.state_shardings)
  assert again.step == 3 and again.data_state == {"row": 3}


def test_no_usable_checkpoint_is_a_config_error_every_time(small, tmp_path, capsys):
  cfg, setup, state, _ = small
  save_steps(tmp_path, cfg, state, [1, 2])
  damage(tmp_path / "2", "mixed_copy")
  damage(tmp_path / "1", "truncate")
  with pytest.raises(ckpt_lib.CheckpointError, match=r"no usable checkpoint .*step 2: .*fingerprint.*step 1: .*cannot read") as e:
    ckpt_lib.Checkpointer(tmp_path, cfg).restore_latest(setup.abstract_state, setup.state_shardings)
  assert isinstance(e.value, ConfigError)  # the command line maps it to exit 2
  assert len(list(tmp_path.glob("*.corrupt-*"))) == 2
  # A second attempt must not quietly start from scratch over a run that had progress.
  with pytest.raises(ckpt_lib.CheckpointError, match="only checkpoints moved aside as corrupt"):
    ckpt_lib.Checkpointer(tmp_path, cfg).restore_latest(setup.abstract_state, setup.state_shardings)


def test_unfinished_save_is_moved_aside_and_the_last_finished_one_restored(small, tmp_path, capsys):
  cfg, setup, state, host = small
  save_steps(tmp_path, cfg, state, [1, 2])
  tmp = tmp_path / ("3" + ckpt_lib.UNFINISHED_SUFFIX)  # what orbax leaves when killed while writing step 3
  (tmp / "state").mkdir(parents=True)
  (tmp / "state" / "half-written").write_bytes(b"x" * 100)
  restored = ckpt_lib.Checkpointer(tmp_path, cfg).restore_latest(setup.abstract_state, setup.state_shardings)
  assert restored.step == 2
  assert_same_tree(restored.state, jax.device_get(variant(state, 2)))
  (moved,) = tmp_path.glob("3.partial-*")
  assert (moved / "state" / "half-written").read_bytes() == b"x" * 100
  err = capsys.readouterr().err
  assert tmp.name in err and "never finished" in err and moved.name in err


def test_a_run_that_does_not_fit_is_an_error_and_nothing_moves(small, tmp_path):
  cfg, _, state, _ = small
  save_steps(tmp_path, cfg, state, [1])
  other = cfg.replace(model=dataclasses.replace(cfg.model, hidden_size=64))
  setup = step_lib.build(other, devices=jax.devices()[:1])
  before = sorted(p.name for p in tmp_path.iterdir())
  with pytest.raises(ckpt_lib.CheckpointError, match=r"does not fit .*params/embed_tokens/embedding is \(512, 32\) float32 there, \(512, 64\)"):
    ckpt_lib.Checkpointer(tmp_path, other).restore_latest(setup.abstract_state, setup.state_shardings)
  assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_data_states_of_another_process_count_are_all_read(small, tmp_path):
  # The data order is global (virtual shards, see ar_lm_jax.data): a run saved by 2 processes resumes on 1,
  # which takes every process's data state; one missing file makes the step unusable (the previous is tried).
  cfg, setup, state, _ = small
  save_steps(tmp_path, cfg, state, [1, 2])
  data = tmp_path / "2" / "data"
  (data / "process_0-of-1.json").rename(data / "process_0-of-2.json")
  (data / "process_1-of-2.json").write_text('{"row": 22}')
  restored = ckpt_lib.Checkpointer(tmp_path, cfg).restore_latest(setup.abstract_state, setup.state_shardings)
  assert restored.step == 2 and restored.data_states == [{"row": 2}, {"row": 22}] and restored.data_state is None
  (data / "process_1-of-2.json").unlink()
  restored = ckpt_lib.Checkpointer(tmp_path, cfg).restore_latest(setup.abstract_state, setup.state_shardings)
  assert restored.step == 1 and restored.data_states == [{"row": 1}] == [restored.data_state]
  assert list(tmp_path.glob("2.corrupt-*"))


def test_keep_policy_and_due_steps(small, tmp_path):
  _, _, state, _ = small
  cfg = small_config(every_steps=2, keep=2, keep_every=4)
  ck = ckpt_lib.Checkpointer(tmp_path, cfg)
  saved = []
  for step in range(1, 13):
    if ck.due(step) and step != 6:  # step 6 was "non-finite": its due save is taken at step 7
      ck.save(step, state, {"row": step})
      saved.append(step)
  ck.close()
  assert saved == [2, 4, 7, 8, 10, 12]
  assert sorted(ck.manager.all_steps()) == [4, 8, 10, 12]  # the last 2, plus every multiple of 4
  assert sorted(int(p.name) for p in tmp_path.iterdir()) == [4, 8, 10, 12]


def test_params_only_checkpoint_is_refused_for_resume(small, tmp_path):
  cfg, setup, state, host = small
  ck = ckpt_lib.Checkpointer(tmp_path, cfg)  # as the HF import writes it: host arrays, no optimizer or data state
  for step in (0, 1):
    ck.save(step, {"step": np.zeros((), np.int32), "params": jax.tree.map(lambda x: x + step, host.params)})
  ck.close()
  assert_same_tree(saved_run.restore_params(tmp_path, 0, cfg), host.params)
  with pytest.raises(ckpt_lib.CheckpointError, match="params-only checkpoint"):
    ckpt_lib.Checkpointer(tmp_path, cfg).restore_latest(setup.abstract_state, setup.state_shardings)
  damage(tmp_path / "0", "mixed_copy")
  with pytest.raises(ckpt_lib.CheckpointError, match="param array.* differ from the fingerprint"):
    saved_run.restore_params(tmp_path, 0, cfg)


def test_train_state_is_saved_under_the_names_of_the_dict_state(small, tmp_path):
  # Runs saved when the state was a dict {"step", "params", "opt_state", "skipped_steps"} must resume, and
  # readers of the files (hf_io, restore_params) must find the same array names and fingerprint keys.
  cfg, setup, state, host = small
  as_dict = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
  for directory, saved in (("dict", as_dict), ("typed", state)):
    ck = ckpt_lib.Checkpointer(tmp_path / directory, cfg)
    ck.save(1, saved, {"row": 1})
    ck.close()
  names = {}
  for directory in ("dict", "typed"):
    step_dir = tmp_path / directory / "1"
    meta = json.loads((step_dir / "state" / "_METADATA").read_text())["tree_metadata"]
    fingerprint = json.loads((step_dir / "fingerprint" / "metadata").read_text())
    names[directory] = (meta, fingerprint)
    restored = ckpt_lib.Checkpointer(tmp_path / directory, cfg).restore_latest(setup.abstract_state, setup.state_shardings)
    assert isinstance(restored.state, step_lib.TrainState)
    assert_same_tree(restored.state, host)
  assert names["dict"] == names["typed"]
  meta, fingerprint = names["typed"]
  assert {"('step',)", "('skipped_steps',)", "('params', 'layers', 'self_attn', 'o_proj', 'kernel')",
          "('opt_state', '1', 'mu', 'lm_head', 'kernel')"} <= set(meta)
  assert {"step", "skipped_steps", "params/lm_head/kernel", "opt_state/1/nu/lm_head/kernel"} <= set(fingerprint)


def test_keep_every_must_be_a_multiple_of_every_steps():
  with pytest.raises(ConfigError, match="checkpoint.keep_every: 5 is not a multiple of checkpoint.every_steps=2"):
    small_config(every_steps=2, keep_every=5)


# ---------------------------------------------------------------------------
# Resharding, on the 8 fake CPU devices of conftest.py.


def spec(x):
  return [list(a) if isinstance(a, tuple) else a for a in x.sharding.spec]


def setup_for(data, model, devices):
  cfg = small_config()
  cfg = cfg.replace(mesh=MeshConfig(data=data, model=model), data=dataclasses.replace(cfg.data, batch_size=8))
  return step_lib.build(cfg, devices=devices)


def test_resharding_4x2_to_8x1_and_to_one_device(tmp_path):
  directory = tmp_path / "ck"
  src = setup_for(4, 2, jax.devices()[:8])
  state = distinct(src, step_lib.init_state(src, 0))
  host = jax.device_get(state)
  ck = ckpt_lib.Checkpointer(directory, src.cfg)
  ck.save(1, state, {"row": 1})
  ck.close()
  out = {}
  for name, (data, model, devices) in {"8x1": (8, 1, jax.devices()[:8]), "1": (1, 1, jax.devices()[:1])}.items():
    dst = setup_for(data, model, devices)
    r = ckpt_lib.Checkpointer(directory, dst.cfg).restore_latest(dst.abstract_state, dst.state_shardings)
    assert_same_tree(r.state, host)
    want = jax.tree.leaves(dst.state_shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
    assert all(x.sharding.is_equivalent_to(w, x.ndim) for x, w in zip(jax.tree.leaves(r.state), want))
    q = r.state.params["layers"]["self_attn"]["q_proj"]["kernel"]
    mu = r.state.opt_state[1].mu["lm_head"]["kernel"]
    out[name] = {"devices": len(q.sharding.device_set), "q_spec": spec(q), "mu_spec": spec(mu)}
  q0 = state.params["layers"]["self_attn"]["q_proj"]["kernel"]
  out["4x2"] = {"devices": len(q0.sharding.device_set), "q_spec": spec(q0),
                "mu_spec": spec(state.opt_state[1].mu["lm_head"]["kernel"])}
  # Saved tensor-parallel (heads over `model`) with ZeRO-1 moments; restored bitwise onto other layouts.
  assert out["4x2"] == {"devices": 8, "q_spec": [None, None, "model", None], "mu_spec": ["data", "model"]}
  assert out["8x1"]["devices"] == 8 and out["8x1"]["mu_spec"] == ["data", "model"]
  assert out["1"]["devices"] == 1


@pytest.mark.parametrize("form", ["tensorstore", "orbax", "unrelated"])
def test_the_asyncio_filter_drops_exactly_a_failed_reads_futures(form):
  """The records the test below meets only when the collector reaches the futures in time (CI: 1 run in 8),
  built here as asyncio logs them: TensorStore's own read future (no Python traceback at all), orbax's
  wrapper, and an unrelated future's error, which must still be logged."""
  tensorstore = ValueError('OUT_OF_RANGE: Error reading "params.lm_head.kernel/0.0" in OCDBT database at local file '
                           '"/tmp/x/2/state/": Requested byte range [98944, 156528) is not valid for value of size 132001')
  orbax = Exception("Encountered error while reading array index: (slice(0, 32, 1), slice(0, 512, 1)).")
  exc = {"tensorstore": tensorstore, "orbax": orbax, "unrelated": ValueError("boom")}[form]
  record = logging.LogRecord("asyncio", logging.ERROR, "base_events.py", 1771,
                             "Future exception was never retrieved\nfuture: <Future finished exception=%r>", (exc,),
                             (type(exc), exc, None))
  assert ckpt_lib._orbax_unretrieved(record) == (form != "unrelated")


def test_a_truncated_array_is_one_warning_line_naming_it(small, tmp_path, capfd, caplog, monkeypatch):
  """A truncated array read leaves orbax's coroutines pending ('Exception ignored in <coroutine ...>', 'Event loop
  is closed' as the collector reaches them) and asyncio logs its other futures as 'never retrieved'; stderr must
  still be the one warning line. pytest's own unraisable hook would hide the first kind, so the test puts back
  Python's default hook (which prints them to stderr) for checkpoint.py's filter to wrap, and collects the garbage
  while it is in place; asyncio's records would reach pytest's log handlers, so none may arrive there either."""
  cfg, setup, state, _ = small
  save_steps(tmp_path, cfg, state, [1, 2])
  damage(tmp_path / "2", "truncate")
  gc.collect()  # earlier tests' debris goes to pytest's hook, not to this test's stderr
  capfd.readouterr()
  monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)
  caplog.set_level(logging.WARNING, logger="asyncio")  # what Python's last-resort handler would print to stderr
  r = ckpt_lib.Checkpointer(tmp_path, cfg).restore_latest(setup.abstract_state, setup.state_shardings)
  assert r.step == 1
  for _ in range(3):  # the failed read's coroutines and futures, and whatever they held
    gc.collect()
  err = capfd.readouterr().err
  lines = err.strip().splitlines()
  assert len(lines) == 1, err[-3000:]
  assert re.match(r'warning: checkpoint step 2 is unusable: cannot read its state arrays \(.*Error reading '
                  r'"(params|opt_state)\.[^"]+" .*\); moved it to 2\.corrupt-', lines[0]), lines[0]
  assert not [rec for rec in caplog.records if rec.name.startswith("asyncio") and rec.levelno >= logging.WARNING], \
      caplog.text[-3000:]


# Two processes over gloo; the read fails on one of them only. Each process prints what `_agreed` gave it.
_ONE_SIDED = r"""
import sys
import jax
from ar_lm_jax import checkpoint as ckpt_lib, distributed, startup
startup.initialize(sys.argv[1], 2, int(sys.argv[2]))
me = jax.process_index()

def attempt(read):
  try:
    return f"ok {ckpt_lib._agreed(read)}"
  except (ckpt_lib._Unusable, ckpt_lib.CheckpointError) as e:
    return f"{type(e).__name__}: {e}"

def damaged_on_1():
  if me == 1:
    raise ckpt_lib._Unusable("cannot read data/process_1-of-2.json (JSONDecodeError)")
  return "read"

def does_not_fit_on_0():
  if me == 0:
    raise ckpt_lib.CheckpointError("checkpoint step 2 does not fit this run's state")
  return "read"

for read in (damaged_on_1, does_not_fit_on_0, lambda: me):
  print(attempt(read), flush=True)
distributed.finish()
"""


def test_a_read_that_fails_on_one_process_gives_every_process_the_same_verdict(tmp_path):
  """The restore's verdict with real processes: a step damaged on process 1 only is unusable on both (so both move
  it aside and fall back together, and neither waits in a collective the other skipped); a step that does not fit
  on one is an error on both; reads that succeed everywhere give each process its own result."""
  outs = run_testing.run_two_processes(lambda i, address: ["-c", _ONE_SIDED, address, str(i)], timeout_s=180)
  for i, (code, out, err) in enumerate(outs):
    assert code == 0, f"process {i}: {err[-3000:]}"
    lines = [l for l in out.splitlines() if not l.startswith("[Gloo]")]
    assert lines == ["_Unusable: process 1: cannot read data/process_1-of-2.json (JSONDecodeError)",
                     "CheckpointError: checkpoint step 2 does not fit this run's state",
                     f"ok {i}"], f"process {i}: {out}\n{err[-2000:]}"
