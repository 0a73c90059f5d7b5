"""metrics.jsonl and TensorBoard after resumes: every step once, in order, with the values of an uninterrupted run."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from ar_lm_jax import loop
from ar_lm_jax.config import apply_overrides, load_config
from ar_lm_jax.metrics import MetricsWriter

pytestmark = pytest.mark.devices(1)  # a one-device process: loop.run and evaluate.load_run take every device they see


def rows(workdir: Path) -> list[dict]:
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def tensorboard_steps(directory: Path, tag: str) -> list[int]:
  """Steps of `tag` as TensorBoard shows them: files in name order, and a SessionLog.START at step S (what
  SummaryWriter(purge_step=S) writes) drops every earlier event at or past S, as TensorBoard's loader does."""
  from tensorboardX.proto import event_pb2
  steps: list[int] = []
  for path in sorted(directory.glob("events.out.tfevents.*")):
    data = path.read_bytes()
    at = 0
    while at < len(data):
      (n,) = struct.unpack("<Q", data[at:at + 8])
      event = event_pb2.Event.FromString(data[at + 12:at + 12 + n])
      at += 12 + n + 4
      if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
        steps = [s for s in steps if s < event.step]
      steps += [event.step for v in event.summary.value if v.tag == tag]
  return steps


def test_a_resume_from_an_older_checkpoint_drops_the_rows_past_it(tmp_path, capsys):
  w = MetricsWriter(tmp_path, progress=False)
  w.start_at(0)
  for step in range(1, 10):
    w.write(step, {"loss": float(step)})
  w.write(9, {"eval/en/loss": 0.5})  # a second row of one step (the eval) joins the first
  w.close()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 10, "lo')  # a kill in the middle of a write
  w = MetricsWriter(tmp_path, progress=False)
  w.start_at(7)  # the newest checkpoint was step 7
  assert "dropped 3 row(s) past step 7" in capsys.readouterr().out
  for step in (8, 9):
    w.write(step, {"loss": 10.0 + step})
  w.close()
  got = rows(tmp_path)
  assert [r["step"] for r in got] == list(range(1, 10))
  assert [r["loss"] for r in got] == [1, 2, 3, 4, 5, 6, 7, 18, 19] and "eval/en/loss" not in got[-1]
  assert tensorboard_steps(tmp_path / "tensorboard", "loss") == list(range(1, 10))
  assert not list(tmp_path.glob(".metrics.jsonl.tmp-*"))


def test_merged_rows_and_a_resume_at_the_last_row_change_nothing(tmp_path):
  w = MetricsWriter(tmp_path, progress=False)
  w.start_at(0)
  w.write(2, {"eval/en/loss": 3.0})  # the trainer writes a step's eval before its train row
  w.write(2, {"loss": 4.0, "lr": 0.1})
  w.close()
  before = (tmp_path / "metrics.jsonl").read_bytes()
  assert rows(tmp_path) == [{"step": 2, "eval/en/loss": 3.0, "loss": 4.0, "lr": 0.1}]
  w = MetricsWriter(tmp_path, progress=False)
  w.start_at(2)
  w.close()
  assert (tmp_path / "metrics.jsonl").read_bytes() == before


def test_trainer_resume_after_a_lost_checkpoint_logs_each_step_once_like_one_run(tmp_path):
  """Steps 1..4 with checkpoints at 2 and 4; step 4's checkpoint is lost (a kill before it was saved), the rerun
  trains 3..4 again: the file must read like the uninterrupted run, eval rows included."""
  cfg = apply_overrides(load_config("tiny"), {
      "data.seq_len": 64, "data.batch_size": 4, "train.steps": 4, "train.log_every": 1, "train.eval_every": 2,
      "train.eval_max_docs": 2, "train.progress": False, "checkpoint.every_steps": 2, "checkpoint.async_save": False})
  once = tmp_path / "once"
  loop.run(cfg, once)
  reference = rows(once)
  assert [r["step"] for r in reference] == list(range(1, 5)) and "eval/en/loss" in reference[1]
  resumed = tmp_path / "resumed"
  shutil.copytree(once, resumed)
  shutil.rmtree(resumed / "checkpoints" / "4")
  loop.run(cfg, resumed)
  again = rows(resumed)
  assert [r["step"] for r in again] == list(range(1, 5))
  strip = lambda r: {k: v for k, v in r.items() if k not in ("tokens_per_sec", "mfu")}
  assert [strip(r) for r in again] == [strip(r) for r in reference]  # bitwise resume: the same numbers
  assert tensorboard_steps(resumed / "tensorboard", "loss") == list(range(1, 5))
