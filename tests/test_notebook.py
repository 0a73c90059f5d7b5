"""notebooks/evaluate.ipynb runs top to bottom, headless, on a run this test trains; in-training eval is logged."""

import json
import math
import os
import struct
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from ar_lm_jax import loop
from ar_lm_jax.config import (CheckpointConfig, Config, DataConfig, ModelConfig, OptimConfig, PhaseConfig,
                              TrainConfig)

REPO_ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.devices(1)  # a one-device process: loop.run and evaluate.load_run take every device they see

NOTEBOOK = REPO_ROOT / "notebooks" / "evaluate.ipynb"
EVAL_KEYS = ("eval/en/loss", "eval/ar/loss", "eval/en/bpb", "eval/ar/bpb")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A 4-step run of a tiny model, evaluated in training at steps 2 and 4, with lm-eval's harness at step 4."""
  cfg = Config(
      name="notebook-test",
      model=ModelConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=96, max_position_embeddings=256),
      data=DataConfig(seq_len=64, batch_size=4, prefetch=0),
      optim=OptimConfig(phases=(PhaseConfig("linear_warmup", steps=1, end_lr=3e-3), PhaseConfig("cosine", steps=3, end_lr=3e-4))),
      train=TrainConfig(steps=4, log_every=1, eval_every=2, eval_max_docs=4, progress=False, harness_every=4,
                        harness_tasks=("arlm_mc_en",), harness_include_path=str(REPO_ROOT / "tests" / "harness_tasks"),
                        harness_limit=4),
      checkpoint=CheckpointConfig(async_save=False),
  )
  wd = tmp_path_factory.mktemp("nb") / "run"
  before = os.getcwd()
  os.chdir(REPO_ROOT)  # the project's task YAMLs name their data files relative to the repo root
  try:
    loop.run(cfg, wd)
  finally:
    os.chdir(before)
  return wd


def tensorboard_tags(directory) -> dict[str, list[int]]:
  """Scalar tag -> steps, read from the TFRecord event files (8-byte length, 4-byte crc, payload, 4-byte crc)."""
  from tensorboardX.proto import event_pb2
  tags: dict[str, list[int]] = {}
  for path in sorted(directory.glob("events.out.tfevents.*")):
    data = path.read_bytes()
    at = 0
    while at < len(data):
      (n,) = struct.unpack("<Q", data[at:at + 8])
      event = event_pb2.Event.FromString(data[at + 12:at + 12 + n])
      at += 12 + n + 4
      for value in event.summary.value:
        tags.setdefault(value.tag, []).append(event.step)
  return tags


def test_training_logs_per_language_eval_to_jsonl_and_tensorboard(workdir):
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  evals = [r for r in rows if "eval/en/loss" in r]
  assert [r["step"] for r in evals] == [2, 4]
  for r in evals:
    assert all(math.isfinite(r[k]) and r[k] > 0 for k in EVAL_KEYS)
  assert evals[1]["eval/en/loss"] < evals[0]["eval/en/loss"]  # it is learning, and the eval sees the new params
  tags = tensorboard_tags(workdir / "tensorboard")
  for k in EVAL_KEYS:
    assert tags[k] == [2, 4]
  assert "loss" in tags


def test_notebook_outputs_are_stripped_in_git():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None


def test_notebook_runs_headless_and_draws(workdir, monkeypatch):
  monkeypatch.setenv("AR_LM_JAX_WORKDIR", str(workdir))
  monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO_ROOT)}}).execute()
  outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  assert any("image/png" in o.get("data", {}) for o in outputs)
  text = "\n".join(o.get("text", "") + o.get("data", {}).get("text/markdown", "") for o in outputs)
  assert str(workdir) in text  # it evaluated the run it was pointed at
  for lang in ("en", "ar", "all"):
    assert f"| {lang} |" in text  # the per-language table (and fertility for en and ar)
  assert text.count("->") == 4  # four generations
  assert text.count("=> assistant:") == 3 and "read no chat source" in text  # chat replies (generate_chat), of a text run
  assert "|arlm_mc_ar" in text and "acc_norm" in text  # lm-eval's benchmark table of the checkpoint (ar_lm_jax/harness.py)
  assert "no harness/* metrics" not in text  # the harness/* curves of the run were drawn (train.harness_every)
