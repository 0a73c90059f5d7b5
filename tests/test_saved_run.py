"""saved_run.py: reading a saved run outside training.

Where a run's checkpoints are ($AR_LM_JAX_WORKDIR, else the newest run), the config a step was saved
with, params-only reads on the host and in shardings compared bitwise with what was saved, saved
shapes against a config, `checkpoint.init_from` one of our checkpoints in either layer layout, and a
run's config fitted to the devices at hand. Damaged checkpoints refused the same way by every reader
(export, evaluate, init_from): test_cli_errors.py; the evaluation and export of a trained run:
test_convert.py.
"""

import dataclasses
import os
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest
from test_checkpoint import assert_same_tree, save_steps, small, variant  # noqa: F401 (small: a fixture)

from ar_lm_jax import hf, saved_run
from ar_lm_jax.checkpoint import CheckpointError, Checkpointer
from ar_lm_jax.config import Config, DataConfig, MeshConfig, ModelConfig, TrainConfig
from ar_lm_jax.model import abstract_params

SMALL = ModelConfig(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=96,
                    max_position_embeddings=128)


def random_params(cfg: ModelConfig, seed: int) -> dict:
  """Our params for `cfg`, every leaf random, drawn on the host from the model's abstract shapes."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: rng.normal(0, 0.05, a.shape).astype(np.float32), nn.meta.unbox(abstract_params(cfg)))


def test_default_workdir_is_the_env_var_else_the_newest_run_with_checkpoints(tmp_path, monkeypatch):
  monkeypatch.delenv("AR_LM_JAX_WORKDIR", raising=False)
  with pytest.raises(CheckpointError, match="experiments.train"):
    saved_run.default_workdir(tmp_path)
  for i, name in enumerate(["tiny-b", "tiny-a", "no-checkpoints"]):
    (tmp_path / name / ("checkpoints" if name != "no-checkpoints" else "logs")).mkdir(parents=True)
    os.utime(tmp_path / name, (1000 + i, 1000 + i))
  assert saved_run.default_workdir(tmp_path) == tmp_path / "tiny-a"
  monkeypatch.setenv("AR_LM_JAX_WORKDIR", "/somewhere/else")
  assert saved_run.default_workdir(tmp_path) == Path("/somewhere/else")


def test_saved_config_and_params_only_reads(small, tmp_path):  # noqa: F811 (the fixture)
  cfg, setup, state, host = small
  save_steps(tmp_path, cfg, state, [5, 7])
  assert saved_run.saved_config(tmp_path) == (7, cfg)
  assert saved_run.saved_config(tmp_path, 5) == (5, cfg)
  with pytest.raises(CheckpointError, match="no checkpoint of step 6"):
    saved_run.saved_config(tmp_path, 6)
  want = jax.device_get(variant(state, 7)).params
  on_host = saved_run.restore_params(tmp_path, 7, cfg)
  assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(on_host))
  assert_same_tree(on_host, want)
  sharded = saved_run.restore_params(tmp_path, 7, cfg, setup.state_shardings.params)
  assert_same_tree(sharded, want)


def test_saved_checkpoint_shape_mismatch_names_the_leaf(tmp_path):
  cfg = Config(model=SMALL, data=dataclasses.replace(DataConfig(), seq_len=64))
  ckpt = Checkpointer(tmp_path, cfg)
  ckpt.save(5, {"step": np.int32(5), "params": random_params(SMALL, 0)}, force=True)
  ckpt.wait()
  ckpt.close()
  other = dataclasses.replace(SMALL, intermediate_size=80)
  with pytest.raises(hf.MappingError) as e:
    saved_run.check_saved_shapes(tmp_path, 5, other)
  assert str(e.value) == "params/layers/mlp/down_proj/kernel: checkpoint shape (2, 96, 64) does not match the config's (2, 80, 64)"
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with pytest.raises(hf.MappingError, match="model.intermediate_size: the config has 80 but the checkpoint"):
    saved_run.init_params(tmp_path, other, jax.tree.map(lambda _: sharding, random_params(other, 0)))


@pytest.mark.parametrize("scan_layers", [True, False])
def test_init_from_our_checkpoint_in_either_layout(tmp_path, scan_layers):
  """`checkpoint.init_from` also takes one of our checkpoints: its params only, re-laid-out if the run unrolls."""
  params = random_params(SMALL, 0)
  ckpt = Checkpointer(tmp_path / "run" / "checkpoints", Config(model=SMALL, data=dataclasses.replace(DataConfig(), seq_len=64)))
  ckpt.save(3, {"step": np.int32(3), "params": params, "opt_state": {"mu": params}}, force=True)
  ckpt.wait()
  ckpt.close()
  target = dataclasses.replace(SMALL, scan_layers=scan_layers)
  one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  shardings = jax.tree.map(lambda _: one_device, nn.meta.unbox(abstract_params(target)))
  assert saved_run.is_our_checkpoint(tmp_path / "run")
  got = saved_run.init_params(tmp_path / "run", target, shardings)
  want = hf.hf_to_params(dict(hf.params_to_hf(params, SMALL, True)).__getitem__, target, scan_layers)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), got, want)


def test_for_devices_keeps_tensor_parallelism_where_it_divides():
  run = Config(name="hf-tiny", model=SMALL, data=DataConfig(seq_len=64, batch_size=4), mesh=MeshConfig(model=2),
               train=TrainConfig(steps=1))
  cfg = saved_run.for_devices(run, 8, batch_rows=5)
  assert (cfg.mesh.data, cfg.mesh.model, cfg.data.batch_size) == (4, 2, 8)
  cfg = saved_run.for_devices(run, 1)
  assert (cfg.mesh.data, cfg.mesh.model, cfg.data.batch_size) == (1, 1, 4)
