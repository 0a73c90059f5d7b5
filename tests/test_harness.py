"""The lm-eval backend against lm-eval's own `hf` backend on the exported model, packing, the command, training.

One briefly trained tiny run (which also ran the harness on its live parameters at
steps 2 and 4) and its Hugging Face export are shared by every test. The tasks are
the project's own small ones in tests/harness_tasks (English and Arabic multiple
choice, rolling log-likelihood, generate_until); their data paths are relative to
the repository root, so the tests run there.
"""

import os

os.environ["HF_DATASETS_OFFLINE"] = "1"  # read by `datasets` when it is imported: before lm-eval
os.environ["HF_HUB_OFFLINE"] = "1"

import contextlib
import glob
import io
import json
import math
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

from ar_lm_jax import cli, harness, hf_io, loop
import run_testing
from ar_lm_jax.config import (CheckpointConfig, Config, DataConfig, ModelConfig, OptimConfig, PhaseConfig,
                              TrainConfig)

pytestmark = pytest.mark.devices(1)  # a one-device process: loop.run and evaluate.load_run take every device they see

REPO_ROOT = Path(__file__).resolve().parents[1]
TASKS_DIR = REPO_ROOT / "tests" / "harness_tasks"
TASKS = ["arlm_mc_en", "arlm_mc_ar", "arlm_rolling", "arlm_gen"]
MAX_LEN = 64  # max_position_embeddings: the rolling task's long documents need several windows
TRAIN_TASKS = ("arlm_mc_en", "arlm_mc_ar")


@pytest.fixture(scope="module", autouse=True)
def at_repo_root():
  before = os.getcwd()
  os.chdir(REPO_ROOT)
  yield
  os.chdir(before)


def harness_run_config(name: str, **train) -> Config:
  """A tiny 4-step run with the in-training harness at steps 2 and 4 (`train`: the harness's tasks)."""
  return Config(
      name=name,
      model=ModelConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=96, max_position_embeddings=MAX_LEN),
      data=DataConfig(seq_len=MAX_LEN, batch_size=4, prefetch=0),
      optim=OptimConfig(phases=(PhaseConfig("linear_warmup", steps=1, end_lr=3e-3), PhaseConfig("cosine", steps=3, end_lr=3e-4))),
      train=TrainConfig(steps=4, log_every=1, progress=False, harness_every=2, **train),
      checkpoint=CheckpointConfig(async_save=False),
  )


@pytest.fixture(scope="module")
def trained(tmp_path_factory, at_repo_root):
  """(workdir, HF export) of a 4-step run with the in-training harness at steps 2 and 4."""
  cfg = harness_run_config("harness-test", harness_tasks=TRAIN_TASKS, harness_include_path=str(TASKS_DIR))
  root = tmp_path_factory.mktemp("harness")
  loop.run(cfg, root / "run")
  hf_io.export_checkpoint(root / "run", root / "hf")
  return root / "run", root / "hf"


@pytest.fixture(scope="module")
def ours(trained):
  lm = harness.ArLmJax(pretrained=str(trained[0]), batch_size=4)
  results = harness.evaluate_tasks(lm, TASKS, include_path=str(TASKS_DIR), log_samples=True, bootstrap_iters=0)
  return lm, results


@pytest.fixture(scope="module")
def reference(trained):
  """lm-eval's own HF backend (PyTorch) on the export, batched so that its padding paths are exercised too."""
  import lm_eval
  return lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(trained[1]), "dtype": "float32"}, device="cpu",
                                 batch_size=4, tasks=TASKS, task_manager=harness.task_manager(str(TASKS_DIR)),
                                 log_samples=True, bootstrap_iters=0, verbosity="ERROR")


def by_doc(samples):
  return sorted(samples, key=lambda s: s["doc_id"])


def test_every_request_and_metric_matches_lm_evals_hf_backend(ours, reference):
  lm, mine = ours
  n_greedy = n_requests = 0
  for task in TASKS:
    a, b = by_doc(mine["samples"][task]), by_doc(reference["samples"][task])
    assert [s["doc_id"] for s in a] == [s["doc_id"] for s in b] and a
    for x, y in zip(a, b):
      assert x["arguments"] == y["arguments"]  # the same prompts and choices
      for (rx,), (ry,) in zip(x["resps"], y["resps"]):
        if isinstance(ry, str):  # generate_until: greedy generations identical
          assert rx == ry
        elif isinstance(ry, tuple):  # loglikelihood: (log p, is_greedy)
          assert rx[0] == pytest.approx(ry[0], rel=1e-4) and rx[1] == ry[1]
          n_greedy += ry[1]
        else:  # loglikelihood_rolling: summed over the windows
          assert rx == pytest.approx(ry, rel=1e-4)
        n_requests += 1
      for metric in x["metrics"]:
        assert np.allclose(x[metric], y[metric], rtol=1e-4), (task, metric)
  for task in TASKS:
    for key, want in reference["results"][task].items():
      if isinstance(want, float) and ("perplexity" in key or "bits_per_byte" in key):
        assert mine["results"][task][key] == pytest.approx(want, rel=1e-4), (task, key)
      elif key != "alias":
        assert mine["results"][task][key] == want, (task, key)
  assert n_requests == 8 * 4 * 2 + 4 + 6
  gens = [s["resps"][0][0] for s in mine["samples"]["arlm_gen"]]
  assert any(g.strip() for g in gens)  # something was generated (and compared)
  longest = max(len(lm.tok_encode(s["doc"]["text"])) for s in mine["samples"]["arlm_rolling"])
  assert longest > lm.max_length  # a document needed several rolling windows


def test_packed_requests_score_like_each_alone_and_like_transformers(ours, trained):
  """Several requests per row (segment ids) give each one's own score; is_greedy on the model's own greedy
  continuation is True, and False once a token is changed; log-probs equal transformers' in float64."""
  from transformers import AutoModelForCausalLM
  from ar_lm_jax import generate
  lm, _ = ours
  tok = lm.tok
  prompts = [tok.encode(t) for t in ("The river runs past the old mill", "تقع المدينة القديمة على تلة", "Bread")]
  greedy = generate.generate(lm.params, lm.engine.model_cfg, prompts, 6)
  seqs = [p + g for p, g in zip(prompts, greedy)]
  changed = [s[:-1] + [(s[-1] + 1) % 1000] for s in seqs]
  all_seqs, n_scored = seqs + changed, [6] * 3 + [6] * 3
  packed = lm.score_sequences(all_seqs, n_scored)
  batches = harness.pack_requests([len(s) - 1 for s in all_seqs], lm.engine.rows, harness.buckets(lm.max_length))
  assert len(batches) == 1 and max(sum(1 for _, r, _ in batches[0][1] if r == row) for row in range(lm.engine.rows)) > 1
  alone = [lm.score_sequences([s], [c])[0] for s, c in zip(all_seqs, n_scored)]
  for (lp, g), (lp1, g1) in zip(packed, alone):
    assert lp == pytest.approx(lp1, rel=1e-5, abs=1e-5) and g == g1
  assert [g for _, g in packed] == [True] * 3 + [False] * 3
  model = AutoModelForCausalLM.from_pretrained(trained[1], dtype=torch.float64).eval()
  for s, (lp, _) in zip(all_seqs, packed):
    with torch.no_grad():
      logp = torch.log_softmax(model(torch.tensor([s[:-1]])).logits[0], -1)
    want = float(logp[torch.arange(len(s) - 7, len(s) - 1), torch.tensor(s[-6:])].sum())
    assert lp == pytest.approx(want, rel=1e-4)


def test_one_compiled_function_per_bucket_length(ours):
  lm, _ = ours
  assert harness.buckets(64) == [64] and harness.buckets(4096) == [64, 128, 256, 512, 1024, 2048, 4096]
  assert harness.buckets(100) == [64, 100]
  for length, scored in lm.engine._compiled:  # (row length, scored positions per row) buckets
    assert length in harness.buckets(lm.max_length) and scored <= length and (scored & (scored - 1) == 0 or scored == length)
  packs = harness.pack_requests([60, 3, 3, 40, 30, 20, 64], rows=2, bucket_lengths=[64, 128])
  for length, placed in packs:
    used = {}
    for i, r, start in placed:
      assert start == used.get(r, 0)  # requests sit back to back in their row
      used[r] = start + [60, 3, 3, 40, 30, 20, 64][i]
    assert max(used.values()) <= length
  assert sorted(i for _, placed in packs for i, _, _ in placed) == list(range(7))


def test_training_logs_harness_metrics_of_the_live_params(trained, ours):
  workdir, _ = trained
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  logged = [r for r in rows if any(k.startswith("harness/") for k in r)]
  assert [r["step"] for r in logged] == [2, 4]
  _, mine = ours  # the step-4 checkpoint evaluated afterwards: the same numbers as on the live params at step 4
  for task in TRAIN_TASKS:
    for metric in ("acc", "acc_norm"):
      assert logged[-1][f"harness/{task}/{metric}"] == mine["results"][task][f"{metric},none"]
  assert not any("stderr" in k for k in logged[-1])
  from tests.test_notebook import tensorboard_tags
  assert tensorboard_tags(workdir / "tensorboard")["harness/arlm_mc_ar/acc"] == [2, 4]


def test_the_harness_time_is_kept_out_of_tokens_per_sec(tmp_path, monkeypatch):
  """A harness call of 2 s after step 2: the tokens/s of steps 2 and 3 (reports trail the dispatch by one step,
  so the call falls into step 2's interval) are the steps' own rate, not diluted by it."""
  import time

  class SlowHarness:
    def __init__(self, setup):
      pass

    def __call__(self, params, step):
      time.sleep(2.0)
      return {"harness/slow/acc": 0.5}

  monkeypatch.setattr(harness, "TrainHarness", SlowHarness)
  cfg = harness_run_config("harness-time-test", harness_tasks=("slow",))
  loop.run(cfg, tmp_path / "run")
  rows = {r["step"]: r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())}
  assert rows[2]["harness/slow/acc"] == 0.5
  tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
  # With the 2 s counted, one of them would log at most tokens_per_step / 2 tokens/s; a step of this model takes
  # milliseconds, so above 1.5 x tokens_per_step (a step under 0.67 s) means the harness was left out.
  for step in (2, 3):
    assert rows[step]["tokens_per_sec"] > 1.5 * tokens_per_step, rows[step]


def run_cli(argv) -> tuple[int, list[str], str]:
  """(exit code, stdout lines, stderr) of `python -m experiments.harness ARGV`, run in-process."""
  from experiments import harness as harness_cli
  out, err = io.StringIO(), io.StringIO()
  with mock.patch.object(sys, "argv", ["experiments.harness", *argv]), contextlib.redirect_stdout(out), \
       contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_info:
    cli.run_main(harness_cli.main)
  return exit_info.value.code, out.getvalue().splitlines(), err.getvalue()


def test_command_prints_the_table_and_json_and_writes_lm_evals_files(trained, ours, tmp_path):
  code, out, err = run_cli([f"--workdir={trained[0]}", "--tasks=arlm_mc_ar", f"--include_path={TASKS_DIR}", "--limit=4",
                            "--batch_size=2", f"--output_path={tmp_path}", "--log_samples"])
  assert code == 0, err
  assert any(line.startswith("|arlm_mc_ar") for line in out)  # lm-eval's table
  last = json.loads(out[-1])
  _, mine = ours
  samples = by_doc(mine["samples"]["arlm_mc_ar"])[:4]
  assert last["results"]["arlm_mc_ar"]["acc,none"] == pytest.approx(np.mean([s["acc"] for s in samples]))
  assert last["step"] == 4 and last["n-shot"] == {"arlm_mc_ar": 0}
  [results_file] = glob.glob(f"{tmp_path}/*/results_*.json")
  [samples_file] = glob.glob(f"{tmp_path}/*/samples_arlm_mc_ar_*.jsonl")
  assert json.loads(open(results_file).read())["results"]["arlm_mc_ar"]["acc,none"] == last["results"]["arlm_mc_ar"]["acc,none"]
  lines = [json.loads(l) for l in open(samples_file)]
  assert [l["doc_id"] for l in lines] == [0, 1, 2, 3]
  for line, want in zip(lines, samples):  # lm-eval's own sample format: resps as strings
    assert [float(r[0][0]) for r in line["resps"]] == pytest.approx([r[0][0] for r in want["resps"]], rel=1e-6)
    assert line["acc"] == want["acc"]


@pytest.mark.parametrize("argv, message", [
    (["--tasks=arabicmmlu_stem"], "MBZUAI/ArabicMMLU"),  # an lm-eval task whose dataset is not cached here
    (["--tasks=arlm_mc_en,no_such_task"], "unknown task(s) no_such_task"),
    (["--tasks=arlm_mc_en", "--include_path=/nonexistent"], "/nonexistent is not a directory"),
    (["--tasks=arlm_mc_en", "--log_samples"], "--log_samples needs --output_path"),
    (["--tasks=arlm_mc_en", "--limit=x"], "--limit"),
])
def test_bad_input_and_uncached_datasets_exit_2_in_one_line(trained, argv, message):
  code, _, err = run_cli([f"--workdir={trained[0]}", f"--include_path={TASKS_DIR}", *argv])
  assert code == 2
  lines = [l for l in err.splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and message in lines[0] and "Traceback" not in err, err


def test_rolling_windows_are_lm_evals(ours):
  """The windows scored for a document are exactly lm-eval's, and they cover every token once."""
  from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
  lm, mine = ours
  for s in mine["samples"]["arlm_rolling"]:
    ids = lm.tok_encode(s["doc"]["text"])
    windows = list(map(make_disjoint_window, get_rolling_token_windows(ids, lm.eot_token_id, lm.max_length, 1)))
    assert sum(len(c) for _, c in windows) == len(ids)
    got = lm.score_sequences([(c + t)[-(lm.max_length + 1):] for c, t in windows], [len(t) for _, t in windows])
    assert sum(lp for lp, _ in got) == pytest.approx(s["resps"][0][0], rel=1e-6)
    assert math.isfinite(s["resps"][0][0])


def run_two_processes(argv, timeout_s: int = 300) -> list[tuple[int, str, str]]:
  """(exit code, stdout, stderr) of `python -m experiments.harness ARGV` as 2 processes over gloo (bounded wait)."""
  return run_testing.run_two_processes(
      lambda i, address: ["-m", "experiments.harness", *argv, f"--coordinator_address={address}", "--num_processes=2",
                          f"--process_id={i}"], timeout_s)


@pytest.mark.skipif(not os.environ.get("AR_LM_SLOW_TESTS"), reason="two processes that score and generate (~60 s); "
                    "set AR_LM_SLOW_TESTS=1")
@pytest.mark.parametrize("tasks", [["arlm_mc_ar", "arlm_gen"]])
def test_two_processes_process_0_leads_and_scores_like_one(trained, ours, tasks):
  """Process 0 runs lm-eval and broadcasts its batches; process 1 follows on the data axis they share."""
  (code0, out0, err0), (code1, out1, err1) = run_two_processes(
      [f"--workdir={trained[0]}", f"--tasks={','.join(tasks)}", f"--include_path={TASKS_DIR}", "--limit=3", "--batch_size=2"])
  assert code0 == 0 and code1 == 0, err0[-2000:] + err1[-2000:]
  assert [l for l in out1.splitlines() if not l.startswith("[Gloo]")] == []  # only process 0 prints (gloo logs its peers)
  last = json.loads(out0.strip().splitlines()[-1])
  _, mine = ours
  for task in tasks:
    samples = by_doc(mine["samples"][task])[:3]
    metric = "acc" if task == "arlm_mc_ar" else "exact_match"
    assert last["results"][task][f"{metric},none"] == pytest.approx(np.mean([s[metric] for s in samples]))


def test_two_processes_a_failure_on_process_0_ends_both_with_exit_2(trained):
  """A dataset missing from the cache fails on process 0 inside lm-eval; process 1, waiting for batches, is
  released (STOP with the failure flag) and exits 2 too instead of waiting forever."""
  (code0, _, err0), (code1, _, err1) = run_two_processes([f"--workdir={trained[0]}", "--tasks=arabicmmlu_stem"])
  assert (code0, code1) == (2, 2), err0[-2000:] + err1[-2000:]
  assert "MBZUAI/ArabicMMLU" in err0 and "process 0 failed" in err1


def test_the_missing_dataset_message_names_both_switches_that_allow_a_download():
  """The command defaults both HF_DATASETS_OFFLINE and HF_HUB_OFFLINE to 1: with only the first set to 0 the
  hub stays offline and the same error comes back (LocalEntryNotFoundError), so the advice names both."""
  message = harness._missing_dataset(ConnectionError("Couldn't reach 'MBZUAI/ArabicMMLU' on the Hub (OfflineModeIsEnabled)"),
                                     ["arabicmmlu"])
  assert "MBZUAI/ArabicMMLU" in message and "HF_DATASETS_OFFLINE=0 HF_HUB_OFFLINE=0" in message
