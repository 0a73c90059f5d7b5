"""The Hugging Face mapping and directory I/O (hf.py, hf_io.py) against transformers' StableLmForCausalLM.

HF -> ours -> HF must be bitwise; ours -> HF must give our logits in fp32
(document by document, HF running each packed document alone) and bf16-rounded
weights in a bf16 export; bad input must fail with a clear message and exit 2.
The trainer-level checks (init_from, export of a trained run, evaluation) are in
test_convert.py.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path

import jax
import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ar_lm_jax import cli, hf, hf_io, saved_run
from ar_lm_jax.checkpoint import Checkpointer
from ar_lm_jax.config import SAMPLE_DIR, Config, DataConfig, ModelConfig
from ar_lm_jax.model import StableLM, abstract_params
from ar_lm_jax.tokenizer import load_tokenizer
from tools import convert_from_pytorch, convert_to_pytorch

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing here may touch the network

SMALL = ModelConfig(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=96,
                    max_position_embeddings=128)
# The real vocab, so that real bilingual text can be tokenized; everything else small.
BILINGUAL = dataclasses.replace(SMALL, vocab_size=100352, hidden_size=32, num_heads=2, intermediate_size=64)


def random_hf_model(cfg: ModelConfig, seed: int):
  """A StableLmForCausalLM for `cfg` with every tensor perturbed (HF inits biases and norms to 0/1)."""
  from transformers import StableLmConfig, StableLmForCausalLM
  fields = {k: v for k, v in hf.hf_config_dict(cfg).items() if k not in ("architectures", "model_type")}
  torch.manual_seed(seed)
  model = StableLmForCausalLM(StableLmConfig(**fields)).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.05)
  return model


def random_params(cfg: ModelConfig, seed: int) -> dict:
  """Our params, every leaf random (norm scales around 1), drawn on the host from the model's abstract shapes."""
  rs = np.random.RandomState(seed)
  shapes = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(abstract_params(cfg)))[0]
  params: dict = {}
  for path, s in shapes:
    keys = tuple(k.key for k in path)
    x = rs.normal(0, 0.05, s.shape) + (1.0 if keys[-1] == "scale" else 0.0)
    hf.set_path(params, keys, x.astype(np.float32))
  return params


def safetensors_dir_tensors(d: Path) -> dict[str, torch.Tensor]:
  from safetensors.torch import load_file
  out = {}
  for f in sorted(d.glob("*.safetensors")):
    out.update(load_file(f))
  return out


def run_tool(tool, argv, capsys) -> tuple[int, str]:
  """(exit code, stderr) of a command-line face, run in-process as `python -m` would run it."""
  with pytest.raises(SystemExit) as exit_info:
    cli.run_main(lambda: tool.main(argv))
  return exit_info.value.code, capsys.readouterr().err


@pytest.fixture(scope="module")
def small_hf(tmp_path_factory):
  """A random small HF model saved by transformers itself, as sharded safetensors."""
  model = random_hf_model(SMALL, 0)
  d = tmp_path_factory.mktemp("small_hf")
  model.save_pretrained(d, max_shard_size="100KB")
  assert (d / hf_io.SAFE_INDEX).is_file()
  return d, {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("scan_layers", [True, False])
def test_hf_to_ours_to_hf_is_bitwise(small_hf, tmp_path, scan_layers):
  src, state = small_hf
  cfg, params = hf_io.load_hf_model(src, dataclasses.replace(ModelConfig(), scan_layers=scan_layers))
  assert ("layers" in params) == scan_layers and ("layers_1" in params) == (not scan_layers)
  assert dataclasses.replace(cfg, scan_layers=True) == dataclasses.replace(SMALL, scan_layers=True)
  summary = hf_io.save_hf_model(params, cfg, tmp_path, "float32", max_shard_bytes=60_000)
  assert summary["shards"] > 1
  index = json.loads((tmp_path / hf_io.SAFE_INDEX).read_text())
  assert set(index["weight_map"]) == set(state) and index["metadata"]["total_size"] == summary["total_bytes"]
  out = safetensors_dir_tensors(tmp_path)
  assert set(out) == set(state)
  for name, t in state.items():
    assert out[name].dtype == torch.float32 and out[name].shape == t.shape, name
    assert out[name].numpy().tobytes() == t.numpy().tobytes(), name


def test_bf16_and_bin_inputs_read_the_same(small_hf, tmp_path):
  """A bf16 safetensors directory and a pytorch_model.bin read as the same weights (bf16 widened exactly)."""
  src, state = small_hf
  _, ref = hf_io.load_hf_model(src)
  (tmp_path / "bin").mkdir()
  (tmp_path / "bin" / "config.json").write_text((src / "config.json").read_text())
  torch.save(state, tmp_path / "bin" / hf_io.BIN_SINGLE)
  _, from_bin = hf_io.load_hf_model(tmp_path / "bin")
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), ref, from_bin)

  model = random_hf_model(SMALL, 0).to(torch.bfloat16)
  model.save_pretrained(tmp_path / "bf16")
  _, from_bf16 = hf_io.load_hf_model(tmp_path / "bf16")
  want = hf.hf_to_params(lambda n: model.state_dict()[n].float().numpy(), SMALL, True)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), want, from_bf16)
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(from_bf16))


def bilingual_docs(n_tokens: int = 40) -> list[np.ndarray]:
  tok = load_tokenizer()
  docs = []
  for lang in ("en", "ar"):
    with open(SAMPLE_DIR / f"{lang}_valid.jsonl") as f:
      texts = [json.loads(line)["text"] for line in f if line.strip()][:2]
    docs += [np.asarray(tok.encode(t)[:n_tokens]) for t in texts]
  return docs


def packed(docs: list[np.ndarray], pad: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  tokens = np.concatenate(docs + [np.zeros(pad, int)])[None]
  segments = np.concatenate([np.full(len(d), i + 1) for i, d in enumerate(docs)] + [np.zeros(pad, int)])[None]
  positions = np.concatenate([np.arange(len(d)) for d in docs] + [np.arange(pad)])[None]
  return tokens, segments, positions


@functools.lru_cache(maxsize=None)
def jitted_apply(cfg: ModelConfig):
  return jax.jit(StableLM(cfg).apply)


def our_logits(cfg: ModelConfig, params, tokens, segments, positions) -> np.ndarray:
  fn = jitted_apply(cfg)
  return np.asarray(fn({"params": params}, jnp.asarray(tokens), jnp.asarray(segments), jnp.asarray(positions)))


@pytest.fixture(scope="module")
def bilingual(tmp_path_factory):
  """Random params of ours (both layouts), a packed bilingual row, and our fp32 logits for it."""
  docs = bilingual_docs()
  row = packed(docs, pad=5)
  out = {}
  for scan in (True, False):
    cfg = dataclasses.replace(BILINGUAL, scan_layers=scan)
    params = random_params(cfg, seed=1)
    out[scan] = (cfg, params, our_logits(cfg, params, *row))
  return docs, out


def hf_logits_per_document(model, docs) -> list[np.ndarray]:
  with torch.no_grad():
    return [model(torch.tensor(d[None], dtype=torch.long)).logits[0].float().numpy() for d in docs]


@pytest.mark.parametrize("scan_layers", [True, False])
def test_export_logits_match_ours_document_by_document(bilingual, tmp_path, scan_layers):
  from transformers import AutoModelForCausalLM
  docs, by_layout = bilingual
  cfg, params, ours = by_layout[scan_layers]
  hf_io.save_hf_model(params, cfg, tmp_path, "float32", scan_layers)
  model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
  assert model.dtype == torch.float32
  start = 0
  for doc, ref in zip(docs, hf_logits_per_document(model, docs)):
    got = ours[0, start:start + len(doc)]
    start += len(doc)
    assert np.abs(got - ref).max() <= 1e-4
  assert np.abs(ours).max() > 0.1  # not a comparison of two near-zero tensors


def test_config_json_round_trips_every_field(tmp_path):
  from transformers import AutoConfig, StableLmConfig
  cfg = dataclasses.replace(BILINGUAL, rope_theta=5e4, partial_rotary_factor=0.5, layer_norm_eps=1e-6)
  hf_io.save_hf_model(random_params(cfg, 3), cfg, tmp_path)
  written = json.loads((tmp_path / "config.json").read_text())
  assert set(StableLmConfig.__annotations__) <= set(written)  # every StableLm field explicit, none left to defaults
  loaded = AutoConfig.from_pretrained(tmp_path)
  assert (loaded.model_type, loaded.architectures) == ("stablelm", ["StableLmForCausalLM"])
  assert loaded.rope_parameters["rope_theta"] == 5e4 and loaded.rope_parameters["partial_rotary_factor"] == 0.5
  assert (loaded.layer_norm_eps, loaded.use_qkv_bias, loaded.num_key_value_heads) == (1e-6, True, cfg.num_heads)
  assert loaded.pad_token_id is None  # as padding_idx it would freeze the EOS embedding row in a PyTorch fine-tune
  assert hf.model_config_from_hf(loaded.to_dict(), cfg) == cfg  # transformers' own re-serialization reads back
  assert hf.model_config_from_hf(written, cfg) == cfg


def test_bf16_export_within_bf16_tolerance(bilingual, tmp_path):
  import ml_dtypes
  from transformers import AutoModelForCausalLM
  docs, by_layout = bilingual
  cfg, params, ours = by_layout[True]
  hf_io.save_hf_model(params, cfg, tmp_path, "bfloat16")
  assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
  # The file holds our weights rounded to nearest bf16, nothing else.
  rounded = {n: x.astype(ml_dtypes.bfloat16) for n, x in hf.params_to_hf(params, cfg, True)}
  saved = safetensors_dir_tensors(tmp_path)
  for name, want in rounded.items():
    assert saved[name].dtype == torch.bfloat16
    assert saved[name].view(torch.int16).numpy().tobytes() == want.view(np.int16).tobytes(), name
  # Widened to fp32, the bf16 export is exactly our model with bf16-rounded weights.
  model32 = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
  widened = jax.tree.map(lambda x: np.asarray(x, ml_dtypes.bfloat16).astype(np.float32), params)
  ours_rounded = our_logits(cfg, widened, *packed(docs, pad=5))
  # Run in bf16 as exported, the logits stay within bf16 precision of our fp32 ones: a few bf16 ulps
  # (2^-8 relative) of the logit scale, accumulated over the 2 layers.
  model16 = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
  assert model16.dtype == torch.bfloat16
  scale = np.abs(ours).max()
  start = 0
  for doc, ref32, ref16 in zip(docs, hf_logits_per_document(model32, docs), hf_logits_per_document(model16, docs)):
    assert np.abs(ours_rounded[0, start:start + len(doc)] - ref32).max() <= 1e-4
    assert np.abs(ours[0, start:start + len(doc)] - ref16).max() <= 8 * 2.0 ** -8 * scale
    start += len(doc)


def test_exported_model_generates_our_greedy_continuation(bilingual, tmp_path):
  from transformers import AutoModelForCausalLM, AutoTokenizer
  from ar_lm_jax.hf_tokenizer import save_hf_tokenizer
  _, by_layout = bilingual
  cfg, params, _ = by_layout[True]
  hf_io.save_hf_model(params, cfg, tmp_path)
  save_hf_tokenizer(load_tokenizer(), str(tmp_path))
  model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
  tok = AutoTokenizer.from_pretrained(tmp_path)
  prompt = "اللغة العربية"
  ids = tok(prompt, return_tensors="pt")["input_ids"]
  assert ids[0].tolist() == load_tokenizer().encode(prompt)
  new = 6
  with torch.no_grad():
    out = model.generate(ids, max_new_tokens=new, do_sample=False)[0].tolist()
  assert len(out) == ids.shape[1] + new and isinstance(tok.decode(out), str)
  # Our greedy decoding (one fixed-length row, padding masked by segment id 0) picks the same tokens.
  T = ids.shape[1] + new
  seq = ids[0].tolist()
  apply = jitted_apply(cfg)
  while len(seq) < T:
    n = len(seq)
    tokens = np.zeros((1, T), np.int32)
    tokens[0, :n] = seq
    segments = (np.arange(T) < n).astype(np.int32)[None]
    logits = apply({"params": params}, tokens, segments, np.arange(T, dtype=np.int32)[None])
    seq.append(int(np.argmax(np.asarray(logits[0, n - 1]))))
  assert out == seq


# ---------------------------------------------------------------------------
# Bad input: one clear line, exit code 2.


def test_shape_mismatch_names_the_tensor_and_both_shapes(small_hf, tmp_path, capsys):
  src, _ = small_hf
  code, err = run_tool(convert_from_pytorch, [f"--hf={src}", f"--out={tmp_path / 'o'}", "--config=tiny"], capsys)
  assert code == 2
  assert err.strip() == ("error: model.embed_tokens.weight: checkpoint shape (512, 64) does not match "
                         "the config's (100352, 64)")
  assert not (tmp_path / "o").exists()  # nothing written


def test_other_model_type_is_refused(tmp_path, capsys):
  (tmp_path / "llama").mkdir()
  (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
  code, err = run_tool(convert_from_pytorch, [f"--hf={tmp_path / 'llama'}", f"--out={tmp_path / 'o'}"], capsys)
  assert code == 2 and "model_type is 'llama', expected 'stablelm'" in err and err.count("\n") == 1


def test_non_empty_out_dir_needs_overwrite(small_hf, tmp_path, capsys):
  src, _ = small_hf
  out = tmp_path / "o"
  out.mkdir()
  (out / "notes.txt").write_text("keep me")
  (out / "config.json").write_text("{}")
  code, err = run_tool(convert_from_pytorch, [f"--hf={src}", f"--out={out}"], capsys)
  assert code == 2 and "exists and is not empty (pass --overwrite" in err
  code, _ = run_tool(convert_from_pytorch, [f"--hf={src}", f"--out={out}", "--overwrite"], capsys)
  assert code == 0
  assert (out / "notes.txt").read_text() == "keep me"  # --overwrite replaces our outputs only
  assert json.loads((out / "config.json").read_text())["model"]["vocab_size"] == 512
  step, cfg = saved_run.saved_config(out / "checkpoints")
  assert step == 0 and cfg.model == SMALL and cfg.data.seq_len == SMALL.max_position_embeddings


def test_missing_step_and_missing_checkpoint(tmp_path, capsys):
  cfg = Config(model=SMALL, data=dataclasses.replace(DataConfig(), seq_len=64))
  ckpt = Checkpointer(tmp_path / "run" / "checkpoints", cfg)
  ckpt.save(4, {"step": np.int32(4), "params": random_params(SMALL, 0)}, force=True)
  ckpt.wait()
  ckpt.close()
  code, err = run_tool(convert_to_pytorch, [f"--checkpoint={tmp_path / 'run'}", "--step=9", f"--out={tmp_path / 'o'}"], capsys)
  assert code == 2 and "step 9" in err and "[4]" in err and err.count("\n") == 1  # names the steps there are
  code, err = run_tool(convert_to_pytorch, [f"--checkpoint={tmp_path / 'nope'}", f"--out={tmp_path / 'o'}"], capsys)
  assert code == 2 and "no such directory" in err
  code, err = run_tool(convert_to_pytorch, [f"--checkpoint={tmp_path / 'run'}", "--step=x", f"--out={tmp_path / 'o'}"], capsys)
  assert code == 2 and "--step" in err
  assert not (tmp_path / "o").exists()
