"""End to end through the trainer: init from Hugging Face, train `tiny`, export, load with transformers, import back.

One short run serves every test: it starts from a random HF model
(`checkpoint.init_from`), so its first logged loss must be HF's loss on the first
batch; its final checkpoint (with optimizer state) is exported with
`tools.convert_to_pytorch` and must score held-out English and Arabic text like
our evaluation does; `tools.convert_from_pytorch` of the export must give back
the same parameters and the same evaluation loss.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

from ar_lm_jax import cli, data, evaluate, hf, loop, saved_run
from ar_lm_jax import step as step_lib
from ar_lm_jax.config import SAMPLE_DIR, apply_overrides, load_config
from ar_lm_jax.model import StableLM
from ar_lm_jax.tokenizer import load_tokenizer
from tools import convert_from_pytorch, convert_to_pytorch

pytestmark = pytest.mark.devices(1)  # a one-device process: loop.run and evaluate.load_run take every device they see

os.environ["HF_HUB_OFFLINE"] = "1"  # the export must load with no network
os.environ["TRANSFORMERS_OFFLINE"] = "1"

EDGE_CASES = ["2024 1234567890", "  spaces   and\ttabs\n\n\nnewlines\r\n", "<|endoftext|>x<|im_start|>",
              "بِسْمِ اللَّهِ الرَّحْمَٰنِ", "العـــــربية", "emoji 😀👍🏽 👩‍👩‍👧", "cafe\u0301"]


def run_tool(tool, argv) -> int:
  with pytest.raises(SystemExit) as exit_info:
    cli.run_main(lambda: tool.main(argv))
  return exit_info.value.code


@pytest.fixture(scope="module")
def hf_init(tmp_path_factory):
  """A random HF model with tiny's architecture, saved by transformers."""
  from transformers import StableLmConfig, StableLmForCausalLM
  model_cfg = load_config("tiny").model
  fields = {k: v for k, v in hf.hf_config_dict(model_cfg).items() if k not in ("architectures", "model_type")}
  torch.manual_seed(0)
  model = StableLmForCausalLM(StableLmConfig(**fields)).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.05)
  d = tmp_path_factory.mktemp("hf_init")
  model.save_pretrained(d)
  return d


@pytest.fixture(scope="module")
def run(hf_init, tmp_path_factory):
  cfg = apply_overrides(load_config("tiny"), {
      "train.steps": 2, "train.log_every": 1, "train.eval_every": 0, "train.progress": False,
      "checkpoint.init_from": str(hf_init)})
  workdir = tmp_path_factory.mktemp("run")
  summary = loop.run(cfg, workdir)
  return cfg, workdir, summary


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
  _, workdir, _ = run
  out = tmp_path_factory.mktemp("hf_export")
  assert run_tool(convert_to_pytorch, [f"--checkpoint={workdir}", f"--out={out}"]) == 0
  assert run_tool(convert_to_pytorch, [f"--checkpoint={workdir}", f"--out={out}"]) == 2  # now exists, not empty
  return out


def hf_row_nll(model, tokens_T, segments_T, positions_T) -> tuple[float, int]:
  """(sum of NLL, scored tokens) of one packed row, HF running each document alone at its own positions."""
  total, count = 0.0, 0
  for s in np.unique(segments_T[segments_T > 0]):
    idx = segments_T == s
    ids = torch.tensor(tokens_T[idx][None], dtype=torch.long)
    with torch.no_grad():
      logits = model(ids, position_ids=torch.tensor(positions_T[idx][None], dtype=torch.long)).logits[0, :-1]
    total += torch.nn.functional.cross_entropy(logits.double(), ids[0, 1:], reduction="sum").item()
    count += int(idx.sum()) - 1
  return total, count


def test_first_logged_loss_is_hf_loss_on_the_first_batch(run, hf_init):
  from transformers import AutoModelForCausalLM
  cfg, workdir, summary = run
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert rows[0]["step"] == 1 and rows[0]["loss"] == summary["first_loss"]
  it = data.make_train_iterator(cfg.data, seed=cfg.train.seed, process_index=0, process_count=1)
  batch = next(it)
  it.close()
  model = AutoModelForCausalLM.from_pretrained(hf_init).eval()
  sums = [hf_row_nll(model, *(batch[k][r] for k in ("tokens", "segment_ids", "positions")))
          for r in range(batch["tokens"].shape[0])]
  hf_loss = sum(s for s, _ in sums) / sum(n for _, n in sums)
  assert abs(summary["first_loss"] - hf_loss) <= 1e-5 * hf_loss
  assert rows[1]["loss"] != rows[0]["loss"]  # it trained


def held_out() -> dict[str, list[str]]:
  docs = {}
  for lang in ("en", "ar"):
    with open(SAMPLE_DIR / f"{lang}_valid.jsonl") as f:
      docs[lang] = [json.loads(line)["text"] for line in f if line.strip()]
  return docs


def language_loss(per_doc: list[tuple[float, int]]) -> float:
  return sum(loss * n for loss, n in per_doc) / sum(n for _, n in per_doc)


def our_per_document_losses(cfg, workdir: Path, step: int) -> dict[str, list[tuple[float, int]]]:
  """(loss, tokens) per held-out document: our model on each document alone, through the train step's loss."""
  tok = load_tokenizer()
  params = saved_run.restore_params(workdir / "checkpoints", step, cfg)
  T = cfg.data.seq_len
  nll = jax.jit(lambda p, b: step_lib.loss_sums(StableLM(cfg.model), p, b, cfg)[0])
  out = {}
  for lang, texts in held_out().items():
    out[lang] = []
    for text in texts:
      ids = tok.encode(text)[:T]
      batch = {k: np.zeros((1, T), np.int32) for k in ("tokens", "segment_ids", "positions")}
      batch["tokens"][0, :len(ids)] = ids
      batch["segment_ids"][0, :len(ids)] = 1
      batch["positions"][0, :len(ids)] = np.arange(len(ids))
      out[lang].append((float(nll(params, batch)) / (len(ids) - 1), len(ids) - 1))
  return out


def our_evaluation(workdir: Path) -> dict[str, dict]:
  """`experiments.evaluate`'s result lines on the held-out documents, by language."""
  lines = evaluate.evaluate_texts(saved_run.load_run(workdir=str(workdir)), held_out())
  return {line["lang"]: line for line in lines}


@pytest.fixture(scope="module")
def ours(run):
  cfg, workdir, _ = run
  return our_per_document_losses(cfg, workdir, 2), our_evaluation(workdir)


def test_export_loads_offline_and_scores_like_our_evaluation(run, exported, ours):
  from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast, StableLmForCausalLM
  cfg = run[0]
  per_doc, evaluation = ours
  model = AutoModelForCausalLM.from_pretrained(exported).eval()
  tok = AutoTokenizer.from_pretrained(exported)
  assert isinstance(model, StableLmForCausalLM) and isinstance(tok, PreTrainedTokenizerFast)
  assert model.get_input_embeddings().weight.shape[0] == cfg.model.vocab_size == 100352  # padding rows kept
  ref_tok = load_tokenizer()
  sample = [json.loads(line)["text"] for path in sorted(SAMPLE_DIR.glob("*.jsonl")) if not path.name.startswith("chat_")
            for line in open(path) if line.strip()]
  texts = sample + EDGE_CASES
  assert tok(texts)["input_ids"] == ref_tok.encode_batch(texts)  # the whole bilingual sample, specials in text as text
  for lang, texts in held_out().items():
    hf_docs = []
    for text in texts:
      ids = tok(text)["input_ids"][:cfg.data.seq_len]
      with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].double()
      nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum").item()
      hf_docs.append((nll / (len(ids) - 1), len(ids) - 1))
    for (hf_loss, hf_n), (our_loss, our_n) in zip(hf_docs, per_doc[lang]):
      assert hf_n == our_n and abs(hf_loss - our_loss) <= 1e-4 * our_loss
    assert sum(n for _, n in hf_docs) == evaluation[lang]["tokens"]
    assert abs(language_loss(hf_docs) - evaluation[lang]["loss"]) <= 1e-4 * evaluation[lang]["loss"]


def test_bf16_export_and_generate(run, tmp_path):
  from transformers import AutoModelForCausalLM, AutoTokenizer
  assert run_tool(convert_to_pytorch, [f"--checkpoint={run[1] / 'checkpoints'}", "--step=2", f"--out={tmp_path}",
                                       "--dtype=bfloat16"]) == 0
  model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
  tok = AutoTokenizer.from_pretrained(tmp_path)
  assert model.dtype == torch.bfloat16
  ids = tok("The capital of Egypt is", return_tensors="pt")["input_ids"]
  out = model.generate(ids, max_new_tokens=4, do_sample=False)
  assert out.shape == (1, ids.shape[1] + 4)


def test_import_of_the_export_gives_the_same_params_and_evaluation(run, exported, ours, tmp_path):
  cfg, workdir, _ = run
  assert run_tool(convert_from_pytorch, [f"--hf={exported}", f"--out={tmp_path}", "--overwrite"]) == 0
  step, imported_cfg = saved_run.saved_config(tmp_path / "checkpoints")
  assert step == 0 and imported_cfg.model == cfg.model and imported_cfg.data.seq_len == cfg.data.seq_len
  a = saved_run.restore_params(workdir / "checkpoints", 2, cfg)
  b = saved_run.restore_params(tmp_path / "checkpoints", 0, cfg)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)
  again = our_evaluation(tmp_path)
  for lang in ("en", "ar"):
    assert abs(again[lang]["loss"] - ours[1][lang]["loss"]) <= 1e-6 * ours[1][lang]["loss"]


def test_a_checkpoint_in_the_workdir_wins_over_init_from(run):
  """Rerunning the same workdir resumes at step 2 instead of starting again from the HF weights."""
  cfg, workdir, _ = run
  summary = loop.run(cfg.replace(train=dataclasses.replace(cfg.train, steps=3)), workdir)
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [1, 2, 3] and summary["first_loss"] == rows[2]["loss"]
