"""KV-cached generation: greedy equals transformers' greedy, the samplers' distributions, EOS, one compile."""

import dataclasses
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_testing import random_stablelm
import torch

from ar_lm_jax import cli, hf
from ar_lm_jax import generate as gen
from ar_lm_jax import step as step_lib
from ar_lm_jax.checkpoint import Checkpointer
from ar_lm_jax.config import Config, DataConfig, ModelConfig, TrainConfig
from ar_lm_jax.tokenizer import EOS_ID, load_tokenizer

pytestmark = pytest.mark.devices(1)  # a one-device process: loop.run and evaluate.load_run take every device they see

MODEL = ModelConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=96, max_position_embeddings=256)
PROMPTS = [
    "The blue bicycle had hung on the storehouse wall for years,",
    "كانت الدراجة الزرقاء معلقة على الجدار",
    "Hi",
    "مرحبا",
]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def hf_model():
  return random_stablelm(MODEL)


@pytest.fixture(scope="module")
def params(hf_model):
  return jax.tree.map(jnp.asarray, hf.hf_to_params(hf_model[1].__getitem__, MODEL, MODEL.scan_layers))


@pytest.fixture(scope="module")
def prompt_ids():
  tok = load_tokenizer()
  return [tok.encode(p) for p in PROMPTS]


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
  """transformers' greedy continuation of one unpadded prompt, with the same ids ruled out as ours."""
  invalid = np.flatnonzero(~gen.valid_token_mask(MODEL.vocab_size)).tolist()
  with torch.no_grad():
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=n, do_sample=False, suppress_tokens=invalid, eos_token_id=EOS_ID,
                         pad_token_id=EOS_ID)
  new = out[0, len(ids):].tolist()
  return new[:new.index(EOS_ID)] if EOS_ID in new else new


@pytest.fixture(scope="module")
def greedy(params, prompt_ids):
  return gen.generate(params, MODEL, prompt_ids, NEW_TOKENS)


def test_batched_greedy_equals_transformers_greedy_english_and_arabic(hf_model, prompt_ids, greedy):
  assert len({len(p) for p in prompt_ids}) == len(prompt_ids)  # different lengths: rows are left-padded differently
  for ids, got in zip(prompt_ids, greedy):
    assert got == hf_greedy(hf_model[0], ids, NEW_TOKENS)
    assert len(got) == NEW_TOKENS


def test_unrolled_layers_decode_like_scanned_ones(hf_model, prompt_ids, greedy):
  cfg = dataclasses.replace(MODEL, scan_layers=False)
  unrolled = jax.tree.map(jnp.asarray, hf.hf_to_params(hf_model[1].__getitem__, cfg, False))
  assert gen.generate(unrolled, cfg, prompt_ids, NEW_TOKENS) == greedy


def test_one_compilation_for_all_tokens_and_other_prompt_lengths(params, prompt_ids, greedy):
  size = gen._generate._cache_size()  # `greedy` compiled the loop for 4 rows and NEW_TOKENS tokens
  shorter = [p[:n] for p, n in zip(prompt_ids, (2, 7, 1, 3))]  # other lengths in the same 32-token bucket
  assert max(len(p) for p in prompt_ids) <= gen.PROMPT_BUCKET
  gen.generate(params, MODEL, shorter, NEW_TOKENS)
  assert gen._generate._cache_size() == size


def test_stops_at_eos_and_returns_the_tokens_before_it(params, prompt_ids, greedy):
  eos = greedy[0][4]
  cut = greedy[0].index(eos)
  same = [prompt_ids[0]] * 4  # every row reaches EOS at the same step
  tokens, segments, positions, lengths = gen.left_pad(same)
  out, steps = gen._generate(params, tokens, segments, positions, lengths, gen.valid_token_mask(MODEL.vocab_size),
                             jnp.int32(eos), jax.random.key(0), cfg=MODEL, max_new_tokens=NEW_TOKENS, sampling=gen.GREEDY)
  assert int(steps) == cut + 1 < NEW_TOKENS  # the loop ended at EOS, not at max_new_tokens
  np.testing.assert_array_equal(np.asarray(out)[:, cut:], eos)
  assert gen.generate(params, MODEL, same, NEW_TOKENS, eos_id=eos) == [greedy[0][:cut]] * 4


def test_top_k_1_sampling_is_greedy(params, prompt_ids, greedy):
  sampled = gen.generate(params, MODEL, prompt_ids, NEW_TOKENS, gen.Sampling(temperature=1.5, top_k=1), jax.random.key(3))
  assert sampled == greedy


def _filtered_probs(logits: np.ndarray, t: float, k: int, p: float) -> np.ndarray:
  """The sampling distribution written out in float64: temperature, then top-k, then nucleus."""
  z = logits.astype(np.float64) / t
  order = np.argsort(-z, kind="stable")
  keep = np.zeros(z.size, bool)
  keep[order[:k or z.size]] = True
  probs = np.where(keep, np.exp(z - z.max()), 0)
  probs /= probs.sum()
  cum = np.cumsum(probs[order])
  n = int(np.searchsorted(cum, p - 1e-12) + 1)  # smallest prefix whose mass reaches p
  nucleus = np.zeros(z.size, bool)
  nucleus[order[:n]] = True
  out = np.where(nucleus, probs, 0)
  return out / out.sum()


@pytest.mark.parametrize("t,k,p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.6), (1.0, 6, 0.8)])
def test_sampling_frequencies_match_the_filtered_distribution(t, k, p):
  logits = np.random.RandomState(0).normal(0, 1.5, 12).astype(np.float32)
  n = 40000
  draws = np.asarray(gen.sample_logits(jnp.broadcast_to(logits, (n, 12)), jax.random.key(1), gen.Sampling(t, k, p)))
  want = _filtered_probs(logits, t, k, p)
  freq = np.bincount(draws, minlength=12) / n
  assert np.all(freq[want == 0] == 0)  # filtered tokens are never drawn
  sigma = np.sqrt(want * (1 - want) / n)  # binomial standard error of each frequency
  assert np.all(np.abs(freq - want) <= 4.5 * sigma), (freq, want)


def test_padding_rows_of_the_vocabulary_are_never_generated():
  logits = np.zeros((2, 100352), np.float32)
  logits[:, 100300] = 10.0  # a padding row of the embedding (>= 100289)
  logits[:, 100256] = 9.0  # the id cl100k leaves unused
  masked = jnp.where(gen.valid_token_mask(100352), logits, -jnp.inf)
  assert set(np.asarray(gen.sample_logits(masked, jax.random.key(0), gen.GREEDY)).tolist()) == {0}


def test_bad_input_is_a_generate_error(params):
  with pytest.raises(gen.GenerateError, match="at least one token"):
    gen.generate(params, MODEL, [[1, 2], []], 4)
  with pytest.raises(gen.GenerateError, match="max_position_embeddings"):
    gen.generate(params, MODEL, [[1] * 250], 10)
  with pytest.raises(gen.GenerateError, match="top_p"):
    gen.generate(params, MODEL, [[1]], 4, gen.Sampling(1.0, 0, 1.5))


# ---------------------------------------------------------------------------
# The command line, on a trainer-format checkpoint of the same weights.


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory, params):
  cfg = Config(name="hf-tiny", model=MODEL, data=DataConfig(seq_len=64, batch_size=2), train=TrainConfig(steps=1))
  setup = step_lib.build(cfg)
  ckpt = Checkpointer(tmp_path_factory.mktemp("gen") / "checkpoints", cfg)
  ckpt.save(0, step_lib.state_from_params(setup, jax.tree.map(jnp.copy, params)), force=True)
  ckpt.wait()
  ckpt.close()
  return ckpt.directory


def run_cli(module, argv, monkeypatch):
  monkeypatch.setattr(sys, "argv", [module.__name__, *argv])
  with pytest.raises(SystemExit) as exit_info:
    cli.run_main(module.main)
  return exit_info.value.code


def test_cli_greedy_matches_transformers(hf_model, checkpoint_dir, prompt_ids, monkeypatch, capsys):
  from experiments import generate as generate_cli
  # The Arabic prompt; English goes through the same library call in the tests above.
  code = run_cli(generate_cli, [f"--checkpoint={checkpoint_dir}", f"--prompt={PROMPTS[1]}", "--greedy",
                                f"--max_new_tokens={NEW_TOKENS}"], monkeypatch)
  text, _, json_line = capsys.readouterr().out.rstrip("\n").rpartition("\n")
  assert code == 0
  last = json.loads(json_line)
  assert last["tokens"] == hf_greedy(hf_model[0], prompt_ids[1], NEW_TOKENS)
  assert last["text"] == text == load_tokenizer().decode(last["tokens"])


@pytest.mark.parametrize("argv,message", [
    (["--prompt=hi"], "exactly one of --workdir and --checkpoint"),
    (["--checkpoint={ckpt}", "--prompt="], "--prompt is empty"),
    (["--checkpoint={ckpt}", "--prompt=hi", "--step=7"], "step 7"),
    (["--checkpoint={ckpt}", "--prompt=hi", "--max_new_tokens=1000"], "max_position_embeddings"),
    (["--checkpoint={ckpt}", "--prompt=hi", "--top_k=-1"], "top_k"),
])
def test_cli_bad_input_exits_2_with_one_line(checkpoint_dir, monkeypatch, capsys, argv, message):
  from experiments import generate as generate_cli
  code = run_cli(generate_cli, [a.format(ckpt=checkpoint_dir) for a in argv], monkeypatch)
  err = capsys.readouterr().err.strip()
  assert code == 2
  assert len(err.splitlines()) == 1 and message in err
