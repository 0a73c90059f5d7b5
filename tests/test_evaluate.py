"""Held-out evaluation against transformers on a converted checkpoint, an independent tokenizer, and byte counts."""

import contextlib
import dataclasses
import io
import json
import math
import os
import sys
import unicodedata
from pathlib import Path
from unittest import mock

import jax
import numpy as np
import pytest
import torch

from ar_lm_jax import cli, hf, hf_io, saved_run
from ar_lm_jax import evaluate as ev
from ar_lm_jax import step as step_lib
from ar_lm_jax.config import SAMPLE_DIR, Config, DataConfig, MeshConfig, ModelConfig, SourceConfig, TrainConfig
from ar_lm_jax.hf_tokenizer import save_hf_tokenizer
from ar_lm_jax.tokenizer import load_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]  # the checkout

os.environ["HF_HUB_OFFLINE"] = "1"
pytestmark = pytest.mark.devices(1)  # a one-device process, but for the 8-device test that compares with it

MODEL = ModelConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=96, max_position_embeddings=256)
SEQ_LEN = 64  # shorter than most sample documents, so truncation is exercised
# mesh.model=2 is kept where the devices allow it (the 8-device run below) and dropped to 1 on one device.
RUN = Config(name="hf-tiny", model=MODEL, data=DataConfig(seq_len=SEQ_LEN, batch_size=4), mesh=MeshConfig(model=2),
             train=TrainConfig(steps=1))
EXTRA = [("en", "Hi"),  # a single token: counted as a document, predicts nothing
         ("ar", "<|endoftext|> ليس رمزا خاصا هنا"),  # special-token text is plain text in evaluation
         ("en", "Cafe\u0301 au lait")]  # not NFC: "e" + combining accent is one byte longer than "é"


def sample_records() -> list[tuple[str, str]]:
  """The bundled held-out documents, languages interleaved, plus EXTRA."""
  by_lang = {lang: [json.loads(l)["text"] for l in (SAMPLE_DIR / f"{lang}_valid.jsonl").read_text().splitlines() if l.strip()]
             for lang in ("en", "ar")}
  mixed = [r for pair in zip(*[[(lang, t) for t in texts] for lang, texts in by_lang.items()]) for r in pair]
  return mixed + EXTRA


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
  from transformers import StableLmConfig, StableLmForCausalLM
  fields = {k: v for k, v in hf.hf_config_dict(MODEL).items() if k not in ("architectures", "model_type")}
  torch.manual_seed(1)
  model = StableLmForCausalLM(StableLmConfig(**fields)).eval()
  with torch.no_grad():  # HF inits biases and norms to 0/1; perturb every tensor so each one matters
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.05)
  hf_dir = tmp_path_factory.mktemp("hf")
  model.save_pretrained(hf_dir)
  save_hf_tokenizer(load_tokenizer(), str(hf_dir))
  return model, hf_dir


@pytest.fixture(scope="module")
def workdir(hf_model, tmp_path_factory):
  """The HF model converted into a trainer-layout workdir (params-only step-0 checkpoint)."""
  out = tmp_path_factory.mktemp("converted") / "run"
  hf_io.import_hf(hf_model[1], out, cfg=RUN)
  return out


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("data") / "heldout.jsonl"
  with open(path, "w") as f:
    for lang, text in sample_records():
      f.write(json.dumps({"text": text, "lang": lang}, ensure_ascii=False) + "\n")
  return path


@pytest.fixture(scope="module")
def reference(hf_model):
  """Per document, independently of our code: transformers' tokenizer and model, in float64 for the sums."""
  from transformers import AutoTokenizer
  model, hf_dir = hf_model
  hf_tok = AutoTokenizer.from_pretrained(hf_dir)
  docs = []
  for lang, text in sample_records():
    ids = hf_tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"][:SEQ_LEN]
    nll = 0.0
    if len(ids) > 1:
      with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
      nll = -float(logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum())
    # ByteLevel maps every byte to one character, so a token's string length is its byte count.
    predicted_bytes = sum(len(t) for t in hf_tok.convert_ids_to_tokens(ids[1:]))
    docs.append({"lang": lang, "nll": nll, "tokens": max(len(ids) - 1, 0), "bytes": predicted_bytes,
                 "text_bytes": len(unicodedata.normalize("NFC", text).encode("utf-8"))})
  return docs


def summarize(docs: list[dict], lang: str) -> dict:
  mine = [d for d in docs if lang in ("all", d["lang"])]
  nll, tokens, n_bytes = (sum(d[k] for d in mine) for k in ("nll", "tokens", "bytes"))
  return {"docs": len(mine), "tokens": tokens, "bytes": n_bytes, "text_bytes": sum(d["text_bytes"] for d in mine),
          "loss": nll / tokens, "bits_per_byte": nll / math.log(2) / n_bytes}


def run_cli(argv) -> tuple[int, list[str], str]:
  """(exit code, stdout lines, stderr) of `python -m experiments.evaluate ARGV`, run in-process."""
  from experiments import evaluate as evaluate_cli
  out, err = io.StringIO(), io.StringIO()
  with mock.patch.object(sys, "argv", ["experiments.evaluate", *argv]), contextlib.redirect_stdout(out), \
       contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_info:
    cli.run_main(evaluate_cli.main)
  return exit_info.value.code, out.getvalue().splitlines(), err.getvalue()


def check_against_reference(lines: list[dict], docs: list[dict]) -> None:
  assert [l["lang"] for l in lines] == ["en", "ar", "all"]  # first appearance in the file, then all
  for line in lines:
    want = summarize(docs, line["lang"])
    for key in ("docs", "tokens", "bytes", "text_bytes"):
      assert line[key] == want[key], (line["lang"], key)
    assert line["loss"] == pytest.approx(want["loss"], rel=1e-4)
    assert line["bits_per_byte"] == pytest.approx(want["bits_per_byte"], rel=1e-4)
    assert line["perplexity"] == pytest.approx(math.exp(line["loss"]), rel=1e-12)
    assert line["bits_per_byte"] == pytest.approx(line["loss"] * line["tokens"] / math.log(2) / line["bytes"], rel=1e-12)


@pytest.fixture(scope="module")
def cli_lines(workdir, data_file):
  code, out, err = run_cli([f"--workdir={workdir}", f"--data={data_file}"])
  assert code == 0, err
  return [json.loads(l) for l in out]


def test_per_language_loss_tokens_and_bytes_match_transformers(cli_lines, reference):
  check_against_reference(cli_lines, reference)
  assert all(l["tokens"] < l["docs"] * SEQ_LEN for l in cli_lines)  # truncation happened
  assert summarize(reference, "ar")["tokens"] / summarize(reference, "ar")["bytes"] > 0.3  # Arabic: ~2 bytes per token


def test_max_docs_per_language_and_batch_size(workdir, data_file, reference):
  code, out, err = run_cli([f"--checkpoint={workdir}/checkpoints/0", f"--data={data_file}", "--max_docs=2",
                            "--batch_size=3"])
  assert code == 0, err
  first_two = [d for i, d in enumerate(reference) if [e["lang"] for e in reference[:i]].count(d["lang"]) < 2]
  check_against_reference([json.loads(l) for l in out], first_two)


def test_sharded_over_8_devices_with_tensor_parallelism_gives_the_same_numbers(workdir, data_file, cli_lines,
                                                                                visible_devices):
  with visible_devices(8):  # the rest of this module runs on one
    code, out, err = run_cli([f"--workdir={workdir}", f"--data={data_file}", "--batch_size=5"])
  assert code == 0, err
  lines = [json.loads(l) for l in out]
  assert len(lines) == len(cli_lines)
  for sharded, single in zip(lines, cli_lines):
    assert {k: v for k, v in sharded.items() if k not in ("loss", "perplexity", "bits_per_byte")} == \
           {k: v for k, v in single.items() if k not in ("loss", "perplexity", "bits_per_byte")}
    assert sharded["loss"] == pytest.approx(single["loss"], rel=1e-5)


def test_first_fit_decreasing_packing():
  docs = [np.arange(n, dtype=np.int32) + 10 * n for n in (6, 5, 1, 4, 3)]
  rows = ev.pack_documents(docs, seq_len=10)
  # 6 -> row 0, 5 -> row 1, 4 -> row 0 (fills it), 3 -> row 1; the 1-token document predicts nothing.
  np.testing.assert_array_equal(rows["tokens"], [[*docs[0], *docs[3]], [*docs[1], *docs[4], 0, 0]])
  np.testing.assert_array_equal(rows["segment_ids"], [[1] * 6 + [2] * 4, [1] * 5 + [2] * 3 + [0, 0]])
  np.testing.assert_array_equal(rows["positions"], [[*range(6), *range(4)], [*range(5), *range(3), 0, 0]])


def test_in_training_evaluator_scores_the_first_documents_like_the_command(workdir, reference):
  n = 3
  sources = tuple(SourceConfig(path=str(SAMPLE_DIR / f"{lang}_valid.jsonl"), lang=lang) for lang in ("en", "ar"))
  run = RUN.replace(data=dataclasses.replace(RUN.data, eval_sources=sources), train=TrainConfig(steps=1, eval_max_docs=n))
  cfg = saved_run.for_devices(run, jax.device_count())
  setup = step_lib.build(cfg)
  params = saved_run.restore_params(workdir / "checkpoints", 0, cfg, setup.state_shardings.params)
  evaluator = ev.TrainEvaluator(setup)
  got = evaluator(params)
  assert got == evaluator(params)  # the second call reuses everything, bit for bit
  for lang in ("en", "ar"):
    first = [d for d in reference if d["lang"] == lang][:n]
    want = summarize(first, "all")
    assert got[f"eval/{lang}/loss"] == pytest.approx(want["loss"], rel=1e-4)
    assert got[f"eval/{lang}/bpb"] == pytest.approx(want["bits_per_byte"], rel=1e-4)


def test_fertility_counts_words_bytes_and_tokens():
  tok = load_tokenizer()
  texts = ["one two  three", "كانت الدراجة"]
  f = ev.fertility(texts, tok)
  tokens = sum(len(tok.encode(t)) for t in texts)
  assert (f["words"], f["bytes"], f["tokens"]) == (5, len("one two  three") + len("كانت الدراجة".encode()), tokens)
  assert f["tokens_per_word"] == tokens / 5


@pytest.mark.parametrize("lines,message", [
    (['{"text": "a b c", "lang": "en"}', "{not json"], "heldout.jsonl:2: not valid JSON"),
    (['{"text": "a b c"}'], "heldout.jsonl:1: expected an object"),
    ([""], "no documents"),
    (['{"text": "a \\ud800 b", "lang": "en"}'], "heldout.jsonl:1: the text is not valid Unicode"),
])
def test_bad_data_exits_2_with_the_line_number(workdir, tmp_path, lines, message):
  path = tmp_path / "heldout.jsonl"
  path.write_text("\n".join(lines) + "\n")
  code, out, err = run_cli([f"--workdir={workdir}", f"--data={path}"])
  assert code == 2 and out == []
  assert len(err.strip().splitlines()) == 1 and message in err


@pytest.mark.parametrize("argv,message", [
    (["--data={data}"], "exactly one of --workdir and --checkpoint"),
    (["--workdir={tmp}", "--data={data}"], "no checkpoint"),
    (["--workdir={work}", "--data={data}", "--step=5"], "step 5"),
    (["--workdir={work}", "--data={tmp}/missing.jsonl"], "is not a file"),
    (["--workdir={work}", "--data={data}", "--max_docs=0"], "--max_docs"),
])
def test_bad_flags_exit_2(workdir, data_file, tmp_path, argv, message):
  argv = [a.format(data=data_file, tmp=tmp_path, work=workdir) for a in argv]
  code, out, err = run_cli(argv)
  assert code == 2 and out == []
  assert len(err.strip().splitlines()) == 1 and message in err
