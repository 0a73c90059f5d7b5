"""Damaged checkpoints and misused commands (issue 13): each exits 2 with one line, and nothing that existed
before is modified or left half-written.

Most cases run a command's `main` in this process through `cli.run_main` (a traceback would fail the test
as an exception); a few run as subprocesses, where the exit code and every printed line are the point.
The checkpoints are params-only (written by `Checkpointer.save` from random arrays, as a conversion
writes them), so a damaged array file is a damaged parameter, and no test compiles a train step.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest

from ar_lm_jax import checkpoint as ckpt_lib
from ar_lm_jax import cli, evaluate, saved_run
from ar_lm_jax.config import SAMPLE_DIR, apply_overrides, dumps, load_config
from ar_lm_jax.model import abstract_params
from experiments import generate as generate_cmd
from experiments import train as train_cmd
from tools import convert_from_pytorch, convert_to_pytorch, inspect_data, plot_schedule, prepare_data

pytestmark = pytest.mark.devices(1)  # a one-device process: loop.run and evaluate.load_run take every device they see

REPO = Path(__file__).parents[1]


def run_tool(main, argv=None, monkeypatch=None) -> int:
  """Exit code of `main` run the way its `python -m` does (argv-less mains read sys.argv)."""
  if argv is not None and monkeypatch is not None:
    monkeypatch.setattr(sys, "argv", ["prog", *argv])
  with pytest.raises(SystemExit) as exit_info:
    cli.run_main(main if argv is None or monkeypatch is not None else (lambda: main(argv)))
  return exit_info.value.code


def one_error_line(capsys) -> str:
  err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
  assert len(err) == 1 and err[0].startswith("error: "), err
  return err[0]


def gist(line: str) -> str:
  """An error line without the reader's own detail in parentheses (which of the damaged arrays a parallel
  read trips on first varies)."""
  return line.split(" (")[0]


def tree_snapshot(path: Path) -> dict:
  """Every file under `path` with its bytes' hash and mode: 'left untouched' means equal snapshots."""
  import hashlib
  return {str(p.relative_to(path)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mode)
          for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def cfg():
  return apply_overrides(load_config("tiny"), {"train.steps": 2, "train.progress": False})


@pytest.fixture(scope="module")
def pristine(cfg, tmp_path_factory) -> Path:
  """A workdir whose checkpoints 1 and 2 hold different random params (params-only, as a conversion saves)."""
  workdir = tmp_path_factory.mktemp("pristine")
  (workdir / "config.json").write_text(dumps(cfg))
  abstract = nn.meta.unbox(abstract_params(cfg.model))
  ck = ckpt_lib.Checkpointer(workdir / "checkpoints", cfg)
  for step in (1, 2):
    rng = np.random.default_rng(step)
    params = jax.tree.map(lambda a: (rng.standard_normal(a.shape) * 0.02).astype(a.dtype), abstract)
    ck.save(step, {"step": np.int32(step), "params": params}, force=True)
    ck.wait()
  ck.close()
  return workdir


def damaged(pristine: Path, tmp_path: Path, kind: str) -> Path:
  workdir = tmp_path / "run"
  shutil.copytree(pristine, workdir)
  step2 = workdir / "checkpoints" / "2"
  chunk = max((p for p in (step2 / "state").rglob("*") if p.is_file() and p.parent.name == "d"),
              key=lambda p: p.stat().st_size)
  data = bytearray(chunk.read_bytes())
  if kind == "flip":  # 48 bytes in the middle of the array file: read back as other numbers, or not at all
    middle = len(data) // 2
    data[middle:middle + 48] = bytes(b ^ 0xFF for b in data[middle:middle + 48])
    chunk.write_bytes(bytes(data))
  elif kind == "truncate":
    chunk.write_bytes(bytes(data[:len(data) // 2]))
  elif kind == "metadata":  # the state's tree metadata cut short: no array can even be located
    meta = step2 / "state" / "_METADATA"
    meta.write_bytes(meta.read_bytes()[:meta.stat().st_size // 3])
  elif kind == "mixed_copy":  # step 1's arrays under step 2's fingerprint: orbax reads them without a murmur
    shutil.rmtree(step2 / "state")
    shutil.copytree(workdir / "checkpoints" / "1" / "state", step2 / "state")
  return workdir


# ---------------------------------------------------------------------------
# 1 and 3: a damaged checkpoint never exports, and every reader refuses it the same way.


@pytest.mark.parametrize("kind", ["flip", "mixed_copy", "truncate", "metadata"])
def test_a_damaged_checkpoint_never_exports_and_every_reader_refuses_it(pristine, cfg, tmp_path, capsys, kind):
  workdir = damaged(pristine, tmp_path, kind)
  before = tree_snapshot(workdir)
  out = tmp_path / "hf"
  assert run_tool(convert_to_pytorch.main, [f"--checkpoint={workdir}", f"--out={out}"]) == 2
  line = one_error_line(capsys)
  assert "step 2" in line and ("differ from the fingerprint" in line or "cannot read" in line), line
  assert not out.exists() and not list(tmp_path.glob(".hf.tmp-*"))  # nothing written, no staging left behind
  # evaluate, generate and the notebook (saved_run.load_run), and init_from: the same check, the same words.
  with pytest.raises(ckpt_lib.CheckpointError) as e:
    saved_run.load_run(workdir=str(workdir))
  assert gist(f"error: {e.value}") == gist(line)
  with pytest.raises(ckpt_lib.CheckpointError, match="step 2"):
    saved_run.init_params(str(workdir), cfg.model, _host_shardings(cfg))
  assert tree_snapshot(workdir) == before  # a reader moves nothing aside: that is the trainer's job
  assert run_tool(convert_to_pytorch.main, [f"--checkpoint={workdir}", "--step=1", f"--out={tmp_path / 'ok'}"]) == 0
  capsys.readouterr()
  if kind != "mixed_copy":  # once is enough
    return
  # A previous export in --out survives a refused --overwrite byte for byte.
  assert run_tool(convert_to_pytorch.main, [f"--checkpoint={pristine}", "--step=1", f"--out={out}"]) == 0
  capsys.readouterr()
  exported = tree_snapshot(out)
  assert run_tool(convert_to_pytorch.main, [f"--checkpoint={workdir}", f"--out={out}", "--overwrite"]) == 2
  assert gist(one_error_line(capsys)) == gist(line) and tree_snapshot(out) == exported


def _host_shardings(cfg):
  abstract = nn.meta.unbox(abstract_params(cfg.model))
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda _: one, abstract)


def test_a_checkpoint_without_fingerprint_is_refused(pristine, tmp_path, capsys):
  workdir = tmp_path / "run"
  shutil.copytree(pristine, workdir)
  shutil.rmtree(workdir / "checkpoints" / "2" / "fingerprint")
  assert run_tool(convert_to_pytorch.main, [f"--checkpoint={workdir}", f"--out={tmp_path / 'hf'}"]) == 2
  assert "no fingerprint" in one_error_line(capsys) and not (tmp_path / "hf").exists()


@pytest.mark.parametrize("kind", ["mixed_copy", "truncate", "metadata"])
def test_damaged_export_in_a_subprocess_is_one_line(pristine, tmp_path, kind):
  """Nothing but the error: a failed read also leaves orbax's event-loop noise behind, which must not show."""
  workdir = damaged(pristine, tmp_path, kind)
  out = tmp_path / "hf"
  r = subprocess.run([sys.executable, "-m", "tools.convert_to_pytorch", f"--checkpoint={workdir}", f"--out={out}"],
                     cwd=REPO, capture_output=True, text=True, timeout=300)
  assert r.returncode == 2 and r.stdout == "", (r.stdout, r.stderr)
  lines = [l for l in r.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: ") and "step 2" in lines[0], r.stderr
  assert not out.exists()


# ---------------------------------------------------------------------------
# 2, 3 and 12: train's workdir, tokenizer and config checks.


def test_train_refuses_workdirs_that_are_not_runs_and_leaves_them_untouched(pristine, tmp_path, capsys, monkeypatch):
  hf_dir = tmp_path / "hf_export"
  assert run_tool(convert_to_pytorch.main, [f"--checkpoint={pristine}", f"--out={hf_dir}"]) == 0
  capsys.readouterr()
  a_file = tmp_path / "a_file"
  a_file.write_text("x")
  other = tmp_path / "notes"
  other.mkdir()
  (other / "todo.txt").write_text("mine")
  blocked = tmp_path / "blocked"
  blocked.write_text("a file where the parent directory should be")
  before = {p: tree_snapshot(p) for p in (hf_dir, other)}
  for workdir, words in [(hf_dir, "not a run config of ours"), (a_file, "is not a directory"),
                         (other, "not empty and not a run of ours"), (blocked / "run", "cannot create")]:
    assert run_tool(train_cmd.main, [f"--workdir={workdir}", "--config.train.steps=1"], monkeypatch) == 2
    assert words in one_error_line(capsys)
  assert {p: tree_snapshot(p) for p in (hf_dir, other)} == before and a_file.read_text() == "x"
  # A run of ours passes the check (it would resume).
  assert cli.check_workdir(pristine) and cli.check_workdir(tmp_path / "new") is False


@pytest.mark.parametrize("ranks", ["missing", "malformed"])
def test_a_bad_tokenizer_is_one_line_and_a_failed_start_leaves_no_workdir(tmp_path, capsys, monkeypatch, ranks):
  path = tmp_path / "ranks.tiktoken"
  if ranks == "malformed":
    path.write_text("garbage\n")
  flag = f"--config.data.tokenizer_path={path}"
  new, empty = tmp_path / "new_run", tmp_path / "empty"
  empty.mkdir()
  for workdir in (new, empty):
    assert run_tool(train_cmd.main, [f"--workdir={workdir}", "--config.train.steps=1", flag], monkeypatch) == 2
    assert str(path) in one_error_line(capsys)
  assert not new.exists() and empty.is_dir() and not any(empty.iterdir())
  assert run_tool(inspect_data.main, ["--batches=1", flag]) == 2
  assert str(path) in one_error_line(capsys)
  out = tmp_path / "tok"
  assert run_tool(prepare_data.main, [f"--input={SAMPLE_DIR / 'en_valid.jsonl'}", f"--output={out}", "--workers=1",
                                      "--no_progress", f"--tokenizer_path={path}"]) == 2
  assert str(path) in one_error_line(capsys) and not out.exists()


def test_config_mistakes_name_the_key_and_the_source(capsys, monkeypatch, tmp_path):
  cases = [
      ('--config.data.sources=[{"path": "ar_lm_jax/sample_data/en_train.jsonl"}]', "data.sources[0]: missing required key(s) lang"),
      ('--config.data.sources=[{"path": "ar_lm_jax/sample_data/en_train.jsonl", "lang": "en"}, '
       '{"path": "ar_lm_jax/sample_data/ar_train.jsonl", "lang": "ar", "weight": -1}]', "data.sources[1]: "),
      ("--config.train.steps=0", "train.steps: must be >= 1"),
      ("--config.checkpoint.keep_aside=-1", "checkpoint.keep_aside"),
  ]
  for flag, words in cases:
    assert run_tool(train_cmd.main, [f"--workdir={tmp_path / 'w'}", flag], monkeypatch) == 2
    assert words in one_error_line(capsys)
  assert not (tmp_path / "w").exists()


def test_a_config_file_that_does_not_parse_is_one_line_naming_it(capsys, monkeypatch, tmp_path):
  mine = tmp_path / "mine.py"
  mine.write_text("from ar_lm_jax.config import Config\n\ndef get_config(:\n  return Config()\n")
  assert run_tool(train_cmd.main, [f"--workdir={tmp_path / 'w'}", f"--config={mine}"], monkeypatch) == 2
  line = one_error_line(capsys)
  assert f"{mine}:3" in line and "SyntaxError" in line, line
  assert not (tmp_path / "w").exists()


# ---------------------------------------------------------------------------
# 3, 8, 12: the tools.


def test_prepare_data_output_that_is_a_file(tmp_path, capsys):
  out = tmp_path / "out"
  out.write_text("keep me")
  assert run_tool(prepare_data.main, [f"--input={SAMPLE_DIR / 'en_valid.jsonl'}", f"--output={out}", "--workers=1",
                                      "--no_progress"]) == 2
  assert "not a directory" in one_error_line(capsys) and out.read_text() == "keep me"


def test_prepare_data_says_a_truncated_input_in_a_line(tmp_path, capsys):
  import gzip
  whole = gzip.compress((SAMPLE_DIR / "en_valid.jsonl").read_bytes())
  src = tmp_path / "cut.jsonl.gz"
  src.write_bytes(whole[:len(whole) // 2])
  assert run_tool(prepare_data.main, [f"--input={src}", f"--output={tmp_path / 'tok'}", "--workers=1",
                                      "--no_progress", "--shards_per_file=1"]) == 0
  captured = capsys.readouterr()
  assert json.loads(captured.out.splitlines()[-1])["skipped"]["truncated_file"] == 1
  assert [l for l in captured.err.splitlines() if l.startswith("warning:")] == [
      "warning: the input ended early (a truncated or corrupt file) in 1 of the shards written: only the documents "
      "before the cut were tokenized"]


def test_plot_schedule_paths_formats_and_ticks(tmp_path, capsys):
  assert run_tool(plot_schedule.main, ["--config=tiny", f"--out={tmp_path / 'lr.foo'}"]) == 2
  assert ".foo" in one_error_line(capsys) and not list(tmp_path.iterdir())
  for given, written in [(tmp_path / "lr", tmp_path / "lr.png"), (tmp_path, tmp_path / "tiny-lr.png"),
                         (tmp_path / "lr.svg", tmp_path / "lr.svg")]:
    assert run_tool(plot_schedule.main, ["--config=tiny", f"--out={given}"]) == 0
    assert f"wrote {written}" in capsys.readouterr().out.splitlines() and written.is_file()
  # The tiny run's 200 steps read as steps, the full recipe's as thousands.
  assert [plot_schedule.step_label(x, 200) for x in (0, 25, 175)] == ["0", "25", "175"]
  assert [plot_schedule.step_label(x, 500_000) for x in (0, 25_000, 500_000)] == ["0", "25k", "500k"]


def test_convert_from_pytorch_names_a_run_directory(pristine, tmp_path, capsys):
  assert run_tool(convert_from_pytorch.main, [f"--hf={pristine}", f"--out={tmp_path / 'o'}"]) == 2
  line = one_error_line(capsys)
  assert str(pristine) in line and "workdir of ours" in line and not (tmp_path / "o").exists()


def test_generate_checks_its_flags_before_reading_the_checkpoint(tmp_path, capsys, monkeypatch):
  missing = tmp_path / "no_such_run"  # never read: the flags are refused first
  for flag, words in [("--prompt=", "--prompt is empty"), ("--max_new_tokens=0", "--max_new_tokens must be >= 1")]:
    argv = [f"--workdir={missing}", "--prompt=hello", flag] if "max_new" in flag else [f"--workdir={missing}", flag]
    assert run_tool(generate_cmd.main, argv, monkeypatch) == 2
    assert words in one_error_line(capsys)


def test_evaluate_reads_the_formats_training_reads(tmp_path):
  import gzip

  import pyarrow as pa
  import pyarrow.parquet as pq
  import zstandard
  ref = evaluate.read_jsonl(SAMPLE_DIR / "ar_valid.jsonl")
  raw = (SAMPLE_DIR / "ar_valid.jsonl").read_bytes()
  (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(raw))
  (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
  texts = [t for _, t in ref]
  pq.write_table(pa.table({"text": texts}), tmp_path / "a.parquet")
  (tmp_path / "a.txt").write_text("".join(t.replace("\n", " ") + "\n" for t in texts), encoding="utf-8")
  for name in ("a.jsonl.gz", "a.jsonl.zst"):
    assert evaluate.read_documents(tmp_path / name) == ref
  assert evaluate.read_documents(tmp_path / "a.parquet", lang="ar") == ref
  # A line is a document, its newline kept, exactly as training's text reader yields it.
  assert evaluate.read_documents(tmp_path / "a.txt", lang="ar") == [("ar", t.replace("\n", " ") + "\n") for t in texts]
  with pytest.raises(evaluate.EvalError, match="give --lang"):
    evaluate.read_documents(tmp_path / "a.parquet")
  cut = gzip.compress(raw)
  (tmp_path / "cut.jsonl.gz").write_bytes(cut[:len(cut) // 2])
  with pytest.raises(evaluate.EvalError, match="truncated"):
    evaluate.read_documents(tmp_path / "cut.jsonl.gz")
  with pytest.raises(evaluate.EvalError, match="truncated"):
    evaluate.read_documents(tmp_path / "cut.jsonl.gz", lang="ar")


def test_moved_aside_directories_are_pruned_to_the_newest_few(cfg, tmp_path, capsys):
  (tmp_path / "7.corrupt-20250101-000000").mkdir()  # an old one, from an earlier start
  (tmp_path / "8.corrupt-20250102-000000").mkdir()
  (tmp_path / "9.corrupt-20250103-000000").mkdir()
  for step in (3, 4, 5):  # three saves a kill interrupted
    (tmp_path / f"{step}.orbax-checkpoint-tmp-{step}").mkdir()
    (tmp_path / f"{step}.orbax-checkpoint-tmp-{step}" / "x").write_text("partial")
  assert cfg.checkpoint.keep_aside == 2
  ck = ckpt_lib.Checkpointer(tmp_path, cfg)
  with pytest.raises(ckpt_lib.CheckpointError, match="only checkpoints moved aside"):  # the unfinished saves moved first
    ck.restore_latest(None, None)
  ck.close()
  assert len(capsys.readouterr().err.strip().splitlines()) == 3  # one warning per moved save
  assert sorted(p.name.split(".")[0] for p in tmp_path.glob("*.partial-*")) == ["4", "5"]
  # Each kind is counted on its own: the oldest corrupt one went too, the newest two stay.
  assert sorted(p.name for p in tmp_path.iterdir() if ".corrupt-" in p.name) == [
      "8.corrupt-20250102-000000", "9.corrupt-20250103-000000"]
  assert ckpt_lib.prune_aside(tmp_path, 2) == [] and len(ckpt_lib.prune_aside(tmp_path, 1)) == 2
