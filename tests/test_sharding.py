"""The mesh, the logical-axis rules table, ZeRO-1/FSDP layouts, and losses that do not depend on the mesh.

Layouts are checked on `AbstractMesh`es (no devices needed). Loss equality runs the
trainer in this process on the first devices of conftest.py's 8: 5 steps of `tiny` on
meshes 1x1, 8x1, 4x2 and 2x4 must log the same losses; and two processes joined over
gloo (subprocesses, 2 devices each, a 2x2 mesh) must log the losses of one 4-device
run that is fed the same global batch.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh

from ar_lm_jax import cli, data, loop
from ar_lm_jax import model as model_lib
from ar_lm_jax import optim, sharding
from ar_lm_jax.config import ConfigError, apply_overrides, load_config

REPO = Path(__file__).resolve().parents[1]
RECIPE_PARAMS = 1_644_515_328
# 5 steps of `tiny`, on rows of 32 tokens instead of 128 to fit the test budget (the per-step cost is
# the 100352-wide LM head; the layouts and collectives are the same). Eval is off: it is not under test.
TINY_5_STEPS = ["--config.train.steps=5", "--config.train.log_every=1", "--config.train.eval_every=0",
                "--config.train.progress=false", "--config.data.seq_len=32",
                # tiny warms up over 10 steps; a 1-step warmup makes 5 steps move the loss clearly
                '--config.optim.phases=[{"kind": "linear_warmup", "steps": 1, "end_lr": 0.003},'
                ' {"kind": "cosine", "steps": 4, "end_lr": 0.0003}]']


def tiny(**sections):
  """`tiny` with e.g. mesh={"data": 2} applied as --config.mesh.data=2 would be."""
  flat = {f"{section}.{k}": json.dumps(v) for section, kv in sections.items() for k, v in kv.items()}
  return apply_overrides(load_config("tiny"), flat)


def layouts(cfg, data: int, model: int):
  """(abstract params, their shardings, abstract opt state, its shardings) on a data x model AbstractMesh."""
  mesh = AbstractMesh((data, model), (sharding.DATA, sharding.MODEL))
  boxed = model_lib.abstract_params(cfg.model)
  params = nn.meta.unbox(boxed)
  params_sh = sharding.param_shardings(boxed, mesh, cfg.mesh)
  tx = optim.build_optimizer(cfg.optim, cfg.train.steps)
  opt = jax.eval_shape(tx.init, params)
  opt_sh = sharding.opt_state_shardings(tx, opt, params_sh, params, mesh, cfg.mesh.shard_optimizer_over_data)
  return params, params_sh, opt, opt_sh


def axes_of(s) -> set:
  return {a for entry in s.spec for a in (entry if isinstance(entry, tuple) else (entry,)) if a}


def spec_tree(tree):
  return jax.tree.map(lambda s: tuple(s.spec), tree, is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))


# ---------------------------------------------------------------------------
# The rules table and the layouts it gives.


def test_rules_table_maps_each_logical_name_once():
  rules = dict(sharding.logical_rules(tiny().mesh))
  assert len(rules) == len(sharding.logical_rules(tiny().mesh))
  assert {k for k, v in rules.items() if v == sharding.MODEL} == {"vocab", "heads", "mlp", "act_heads", "act_mlp", "act_vocab"}
  assert {k for k, v in rules.items() if v == sharding.DATA} == {"batch"}
  assert dict(sharding.logical_rules(tiny(mesh={"fsdp": True}).mesh))["embed"] == sharding.DATA


@pytest.mark.parametrize("scan_layers", [True, False])
def test_megatron_layout_of_every_parameter(scan_layers):
  cfg = tiny(model={"scan_layers": scan_layers})
  _, params_sh, _, _ = layouts(cfg, 4, 2)
  specs = spec_tree(params_sh)
  block = specs["layers"] if scan_layers else specs["layers_1"]
  lead = (None,) if scan_layers else ()  # the stacked layer axis is never sharded
  M = sharding.MODEL
  for name in ("q_proj", "k_proj", "v_proj"):  # column-parallel: the heads (output) dim is split
    assert block["self_attn"][name]["kernel"] == lead + (None, M, None)
    assert block["self_attn"][name]["bias"] == lead + (M, None)
  assert block["self_attn"]["o_proj"]["kernel"] == lead + (M, None, None)  # row-parallel: the contracted heads
  assert block["mlp"]["gate_proj"]["kernel"] == block["mlp"]["up_proj"]["kernel"] == lead + (None, M)
  assert block["mlp"]["down_proj"]["kernel"] == lead + (M, None)
  for norm in ("input_layernorm", "post_attention_layernorm"):
    assert block[norm]["scale"] == block[norm]["bias"] == lead + (None,)
  assert specs["embed_tokens"]["embedding"] == (M, None)  # vocab-parallel
  assert specs["lm_head"]["kernel"] == (None, M)
  assert specs["norm"]["scale"] == (None,)


def test_zero1_shards_moments_over_data_and_not_params():
  params, params_sh, opt, opt_sh = layouts(tiny(), 4, 2)
  assert all(sharding.DATA not in axes_of(s) for s in jax.tree.leaves(params_sh))
  adam = opt_sh[1]
  for moments in (adam.mu, adam.nu):
    flat = jax.tree.leaves(moments)
    # Every moment has a dim divisible by 4 in tiny, so every one of them is split over data too.
    assert flat and all(sharding.DATA in axes_of(s) for s in flat)
    # ... on top of its parameter's own model split.
    for p_s, m_s in zip(jax.tree.leaves(params_sh), flat):
      assert axes_of(p_s) <= axes_of(m_s)
  assert axes_of(adam.count) == set() and axes_of(opt_sh[3].count) == set()
  # Bytes: parameters split over model only, moments over data x model.
  total = model_lib.param_count(params)
  assert sharding.bytes_per_device(params, params_sh) == pytest.approx(4 * total / 2, rel=0.01)
  assert sharding.bytes_per_device(opt, opt_sh) == pytest.approx(2 * 4 * total / 8, rel=0.01)


@pytest.mark.parametrize("zero1", [True, False])
def test_train_step_reduces_gradients_onto_the_moment_layout(zero1):
  """The gradients' layout (what the step constrains them to) is exactly the moments': one reduction onto the shards."""
  cfg = tiny(mesh={"shard_optimizer_over_data": zero1})
  params, params_sh, _, opt_sh = layouts(cfg, 4, 2)
  mesh = AbstractMesh((4, 2), (sharding.DATA, sharding.MODEL))
  grad_sh = sharding.moment_shardings(params_sh, params, mesh, zero1)
  assert spec_tree(grad_sh) == spec_tree(opt_sh[1].mu) == spec_tree(opt_sh[1].nu)
  assert any(sharding.DATA in axes_of(s) for s in jax.tree.leaves(grad_sh)) == zero1


def test_without_zero1_moments_follow_params():
  _, params_sh, _, opt_sh = layouts(tiny(mesh={"shard_optimizer_over_data": False}), 4, 2)
  assert spec_tree(opt_sh[1].mu) == spec_tree(params_sh) == spec_tree(opt_sh[1].nu)


def test_fsdp_shards_params_over_data_too():
  params, params_sh, opt, opt_sh = layouts(tiny(mesh={"fsdp": True}), 4, 2)
  specs = spec_tree(params_sh)
  assert specs["layers"]["self_attn"]["q_proj"]["kernel"] == (None, sharding.DATA, sharding.MODEL, None)
  assert specs["lm_head"]["kernel"] == (sharding.DATA, sharding.MODEL)
  for p_s, m_s in zip(jax.tree.leaves(params_sh), jax.tree.leaves(opt_sh[1].mu)):
    assert sharding.DATA in axes_of(m_s)  # ZeRO still splits the moments of norms and biases
    if sharding.DATA in axes_of(p_s):
      assert m_s.spec == p_s.spec  # a moment already split over data keeps its parameter's layout
  total = model_lib.param_count(params)
  assert sharding.bytes_per_device(params, params_sh) == pytest.approx(4 * total / 8, rel=0.01)


@pytest.mark.parametrize("data,model", [(16, 1), (8, 2)])
def test_recipe_zero1_bytes_per_device(data, model):
  cfg = apply_overrides(load_config("ar_stablelm_2_1_6b"), {"mesh.data": str(data), "mesh.model": str(model)})
  params, params_sh, opt, opt_sh = layouts(cfg, data, model)
  assert model_lib.param_count(params) == RECIPE_PARAMS
  assert sharding.bytes_per_device(params, params_sh) == pytest.approx(4 * RECIPE_PARAMS / model, rel=0.01)
  assert sharding.bytes_per_device(opt, opt_sh) == pytest.approx(2 * 4 * RECIPE_PARAMS / (data * model), rel=0.01)


def test_readme_one_node_resume_of_the_recipe_fits_8_gpus_with_the_same_global_batch():
  """README: a 2-node run whose node is lost continues on the remaining node. The recipe pins mesh.data=16,
  so the command there needs the overrides the README gives; with them the mesh fits 8 GPUs, the global
  batch stays 96 and each GPU still holds micro-batches of 6 (what the 2-node run fit in memory)."""
  readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
  paragraph = readme[readme.index("If a node is lost"):].split("\n\n")[0]
  flags = dict(f.split("=", 1) for f in re.findall(r"--config\.([\w.]+=\S+?)[`\s]", paragraph))
  two_nodes = load_config("ar_stablelm_2_1_6b")
  assert sharding.validate(two_nodes, 16, 2) == (16, 1)
  with pytest.raises(ConfigError, match="does not match the 8 devices"):
    sharding.validate(two_nodes, 8, 1)  # the same command, unchanged, on one node
  one_node = apply_overrides(two_nodes, flags)
  data_axis, _ = sharding.validate(one_node, 8, 1)
  assert one_node.data.batch_size == two_nodes.data.batch_size == 96
  per_gpu = lambda c, d: c.data.batch_size // c.optim.grad_accum_steps // d
  assert per_gpu(one_node, data_axis) == per_gpu(two_nodes, 16) == 6
  assert data.virtual_shard_count(one_node.data) == data.virtual_shard_count(two_nodes.data) == 16


# ---------------------------------------------------------------------------
# Bad meshes, and the device order.


@pytest.mark.parametrize("overrides,devices,processes,match", [
    ({"mesh": {"data": 2, "model": 2}}, 8, 1, "data=2 x model=2 = 4 does not match the 8 devices"),
    ({"mesh": {"data": -1, "model": 3}}, 8, 1, "mesh.model: 3 does not divide the 8 devices"),
    ({"mesh": {"data": 1, "model": 8}}, 8, 1, "does not divide model.num_heads=4"),
    ({"mesh": {"data": 2, "model": 4}, "model": {"intermediate_size": 178}}, 8, 1, "does not divide model.intermediate_size=178"),
    ({"mesh": {"data": 2, "model": 4}, "model": {"vocab_size": 100354}}, 8, 1, "does not divide model.vocab_size=100354"),
    ({"mesh": {"data": 3, "model": 1}}, 3, 1, "micro-batch of 8 sequences .* does not divide over mesh.data=3"),
    ({"mesh": {"data": 4, "model": 1}, "optim": {"grad_accum_steps": 4}}, 4, 1, "micro-batch of 2 sequences"),
    ({"mesh": {"data": 1, "model": 4}}, 4, 2, "mesh.data=1 must be a multiple of the 2 processes"),
])
def test_validate_rejects(overrides, devices, processes, match):
  with pytest.raises(ConfigError, match=match):
    sharding.validate(tiny(**overrides), devices, processes)


def test_validate_resolves_minus_one():
  assert sharding.validate(tiny(mesh={"data": -1, "model": 2}), 8) == (4, 2)
  assert sharding.validate(tiny(mesh={"data": 2, "model": 2}), 4, 2) == (2, 2)  # one data row per process


class FakeDevice:

  def __init__(self, process_index: int, id: int):
    self.process_index, self.id = process_index, id


def test_device_grid_puts_each_process_on_whole_rows():
  devices = [FakeDevice(p, p * 4 + i) for p in (1, 0) for i in (3, 1, 0, 2)]  # scrambled on purpose
  grid = sharding.device_grid(devices, 4, 2)
  assert [[d.id for d in row] for row in grid] == [[0, 1], [2, 3], [4, 5], [6, 7]]
  assert [{d.process_index for d in row} for row in grid] == [{0}, {0}, {1}, {1}]


# ---------------------------------------------------------------------------
# Losses across meshes (in this process, on the first d*m of conftest.py's 8 devices) and across processes
# (two subprocesses joined over gloo, 2 devices each).


def mesh_run(visible_devices, workdir: Path, mesh: str) -> list[float]:
  """`loop.run` as `python -m experiments.train` would run it in a process of d*m devices; the logged losses."""
  d, m = mesh.split("x")
  flags = TINY_5_STEPS + [f"--config.mesh.data={d}", f"--config.mesh.model={m}"]
  cfg, _ = cli.parse_args(cli.make_parser("mesh runs"), flags)
  with visible_devices(int(d) * int(m)):
    summary = loop.run(cfg, workdir / mesh)
  return [json.loads(line)["loss"] for line in open(summary["metrics"])]


class BothProcesses:
  """One process standing in for both processes of a 2-process run: each global batch is process 0's slice
  followed by process 1's (the rows each process's devices hold on a process-major mesh), read from
  `make_train_iterator(process_count=2)` as they would."""

  def __init__(self, its):
    self.its = its

  def __next__(self):
    parts = [next(it) for it in self.its]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def get_state(self):
    return {str(i): it.get_state() for i, it in enumerate(self.its)}

  def set_state(self, state):
    for i, it in enumerate(self.its):
      it.set_state(state[str(i)])

  def stats(self):
    return {}


def concat_processes_run(visible_devices, workdir: Path, flags: list[str]) -> list[float]:
  """The reference of the two-process run: one process of 4 devices fed both processes' batches."""
  make = data.make_train_iterator
  cfg, _ = cli.parse_args(cli.make_parser("reference"), flags)
  with pytest.MonkeyPatch.context() as mp, visible_devices(4):
    mp.setattr(data, "make_train_iterator", lambda cfg, *, seed, process_index, process_count: BothProcesses(
        [make(cfg, seed=seed, process_index=i, process_count=2) for i in range(2)]))
    summary = loop.run(cfg, workdir)
  return [json.loads(line)["loss"] for line in open(summary["metrics"])]


def env_with_devices(n: int) -> dict:
  return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}", "JAX_PLATFORMS": "cpu",
          "PYTHONPATH": str(REPO)}


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Runs:
  """Subprocesses started together (so that they share the 2 cores), each awaited by the test that checks it."""

  def __init__(self, workdir: Path):
    self.workdir = workdir
    self.procs: dict[str, tuple[subprocess.Popen, Path]] = {}

  def start(self, name: str, args: list[str], devices: int) -> None:
    log = self.workdir / f"{name}.log"
    with open(log, "w") as f:
      # Its own session, so that a hung child (e.g. one waiting for its peer) dies with its helpers.
      proc = subprocess.Popen([sys.executable, *args], env=env_with_devices(devices), cwd=REPO,
                              stdout=f, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    self.procs[name] = (proc, log)

  def output(self, name: str, timeout_s: float = 600) -> str:
    proc, log = self.procs[name]
    try:
      rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
      self.kill()
      pytest.fail(f"{name} still running after {timeout_s}s:\n{log.read_text()[-3000:]}")
    text = log.read_text()
    assert rc == 0, f"{name} exited {rc}:\n{text[-3000:]}"
    return text

  def kill(self) -> None:
    for proc, _ in self.procs.values():
      if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, visible_devices):
  """Every trainer run of this file: the two processes of 2x2 start first, in the background (so that they share
  the 2 cores with the rest); then, here, 1x1; 8x1, 4x2, 2x4; and the two processes' one-process reference."""
  r = Runs(tmp_path_factory.mktemp("runs"))
  flags = TINY_5_STEPS + ["--config.mesh.data=2", "--config.mesh.model=2"]
  cluster = [f"--coordinator_address=127.0.0.1:{free_port()}", "--num_processes=2"]
  for i in range(2):
    r.start(f"process {i}", ["-m", "experiments.train", f"--workdir={r.workdir / 'two'}", *cluster, f"--process_id={i}",
                             *flags], devices=2)
  try:
    r.losses = {mesh: mesh_run(visible_devices, r.workdir, mesh) for mesh in ("1x1", "8x1", "4x2", "2x4")}
    r.losses["reference"] = concat_processes_run(visible_devices, r.workdir / "one", flags)
  except BaseException:
    r.kill()
    raise
  yield r
  r.kill()


def last_json(text: str):
  return json.loads(text.strip().splitlines()[-1])


def assert_same_losses(a: list[float], b: list[float], what: str):
  assert len(a) == len(b) == 5, what
  for x, y in zip(a, b):
    assert abs(x - y) <= 1e-4 * abs(y), f"{what}: {a} vs {b}"


def test_losses_equal_on_1x1_8x1_4x2_2x4(runs):
  losses = {k: v for k, v in runs.losses.items() if k != "reference"}
  reference = losses.pop("1x1")
  assert reference[-1] < reference[0] - 0.05  # it trained: equality is not between constants
  assert set(losses) == {"8x1", "4x2", "2x4"}
  for mesh, got in losses.items():
    assert_same_losses(got, reference, f"mesh {mesh} vs 1x1")


def test_two_processes_match_one_process_on_the_same_global_batch(runs):
  out = {name: runs.output(name) for name in ("process 0", "process 1")}
  two = [json.loads(line)["loss"] for line in (runs.workdir / "two" / "metrics.jsonl").read_text().splitlines()]
  one = runs.losses["reference"]
  assert one[-1] < one[0] - 0.05
  assert_same_losses(two, one, "2 processes x 2 devices vs 1 process x 4 devices")
  # Only process 0 reports: its summary is the last line; process 1 prints nothing of its own.
  assert last_json(out["process 0"])["steps"] == 5
  assert "metrics:" not in out["process 1"] and "train step compiled" not in out["process 1"]


# ---------------------------------------------------------------------------
# FSDP in the compiled step: per-layer gathers and reductions inside the scanned layer's loop.

FSDP_COLLECTIVES = """
import json
from ar_lm_jax import cli, collectives
from ar_lm_jax import step as step_lib
cfg, _ = cli.parse_args(cli.make_parser("fsdp"), ["--config=tiny", "--config.mesh.data=8", "--config.mesh.fsdp=true",
                                                  "--config.model.num_layers=4", "--config.data.seq_len=32",
                                                  "--config.model.dtype=bfloat16"])
setup = step_lib.build(cfg)
with setup.activate():
  compiled = step_lib.jit_train_step(setup).lower(setup.abstract_state, step_lib.abstract_batch(cfg)).compile()
print(json.dumps([[c.kind, c.operand_bytes, c.result_bytes, c.trips, list(c.loops), c.op_name]
                  for c in collectives.collective_report(compiled).collectives]))
"""


def test_fsdp_gathers_and_reduces_each_layer_inside_the_layer_loop():
  """FSDP on 8 CPU devices: each layer's weights are all-gathered inside the scanned layer's loop
  (again in the backward loop, for the rematerialized forward), and each layer's weight gradients are
  reduced there too. So no chip ever holds every layer's gathered weights, nor unsharded gradients of
  the stack: on XLA:TPU the recipe's buffer assignment has no full-width weight or gradient of any
  layer (docs/tpu.md). A hoisted gather (before the loop: [L, D, F] on every chip) fails this."""
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", FSDP_COLLECTIVES], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  colls = json.loads(proc.stdout.strip().splitlines()[-1])
  m = tiny().model
  L, D, F, NH = 4, m.hidden_size, m.intermediate_size, m.num_heads * m.head_dim
  forward, backward = "jvp(StableLM)/while", "transpose(jvp(StableLM))/while"
  # bf16 bytes of one layer's matrix, gathered: q/k/v/o are [D, N*H], gate/up/down [D, F].
  matrices = {"q_proj": D * NH, "k_proj": D * NH, "v_proj": D * NH, "o_proj": NH * D,
              "gate_proj": D * F, "up_proj": D * F, "down_proj": F * D}
  for scan_loop in (forward, backward):
    for name, n in matrices.items():
      gathers = [c for c in colls if c[0] == "all-gather" and f"/{name}/" in c[5] and c[4] and c[4][-1].endswith(scan_loop)]
      assert len(gathers) == 1, (scan_loop, name, gathers)
      _, operand, result, trips, _, _ = gathers[0]
      # One layer's matrix from its 8 shards, once per layer. XLA:CPU gathers the fp32 shard and casts after
      # (4 bytes a weight); XLA:TPU casts the shards to bf16 before the layer loop and gathers bf16.
      assert (result, operand, trips) == (4 * n, 4 * n // 8, L), (scan_loop, name, gathers[0])
  # Nothing of the layer stack is gathered outside the loops (the embedding and LM head are not in the stack).
  assert not [c for c in colls if c[0] == "all-gather" and not c[4] and "/layers/" in c[5]]
  # Each layer's fp32 weight gradients (7 matrices) are reduced in the backward loop, once per layer.
  reduced = sum(c[1] for c in colls if c[0] in ("all-reduce", "reduce-scatter") and c[4] and c[4][-1].endswith(backward)
                and c[3] == L)
  assert reduced >= 4 * sum(matrices.values())
  # ... and none of the layers' matrices is reduced after the loop (the LM head's gradient is, once).
  assert not [c for c in colls if c[0] in ("all-reduce", "reduce-scatter") and not c[4] and "/layers/" in c[5]]
