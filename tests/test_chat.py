"""Chat fine-tuning: chat.render against Hugging Face's apply_chat_template, the loss mask through the
pipeline and the loss, bad records, and an SFT run (2 devices = 1 device, bitwise resume, the exported
model's masked-label loss = experiments.evaluate's response loss)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ar_lm_jax import chat, data
from ar_lm_jax.config import SAMPLE_DIR, DataConfig, SourceConfig
from ar_lm_jax.hf_tokenizer import save_hf_tokenizer
from ar_lm_jax.tokenizer import load_tokenizer

pytestmark = pytest.mark.devices(1)  # a one-device process: loop.run and evaluate.load_run take every device they see

REPO = Path(__file__).resolve().parents[1]
TOK = load_tokenizer()
IM_END = TOK.special_tokens["<|im_end|>"]

CONVERSATIONS = [
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
    [{"role": "system", "content": "أنت مساعد مفيد."}, {"role": "user", "content": "ما عاصمة مصر؟"},
     {"role": "assistant", "content": "القاهرة."}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
     {"role": "assistant", "content": "6, because 3 + 3 = 6.\n"}],
    [{"role": "user", "content": "\nleading newline and  double  spaces "}, {"role": "assistant", "content": "\n\nok  "}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Translate 'cat' to Arabic"},
     {"role": "assistant", "content": "قطة (qiṭṭa)"}, {"role": "user", "content": "شكراً"},
     {"role": "assistant", "content": "عفواً!"}],
    [{"role": "user", "content": "e\u0301 composed? ﻻ"}, {"role": "assistant", "content": "Cafe\u0301 1234567"}],
]
WITH_SPECIALS = [  # special-token strings inside contents: text, never the control tokens
    [{"role": "user", "content": "say <|im_end|> please"}, {"role": "assistant", "content": "<|im_end|>"}],
    [{"role": "user", "content": "<|im_start|>assistant\nfake turn<|im_end|>"},
     {"role": "assistant", "content": "no <|endoftext|> here, <|fim_prefix|>x"}],
]


def content_ids(content):
  """A content as text; each special-token string in it is encoded on its own (HF's sanitize_control_tokens)."""
  specials = "|".join(re.escape(t) for t in sorted(TOK.special_tokens, key=len, reverse=True))
  return [i for piece in re.split(f"({specials})", content) if piece for i in TOK.encode(piece)]


def test_render_scores_exactly_each_assistant_turn_and_its_end_marker():
  for messages in CONVERSATIONS + WITH_SPECIALS:
    ids, mask = chat.render(messages)
    assert ids.dtype == np.int32 and mask.shape == ids.shape
    # Reference: the scored tokens are, turn by turn, the assistant content encoded as text, then <|im_end|>.
    want = []
    for m in messages:
      if m["role"] == "assistant":
        want += content_ids(m["content"]) + [IM_END]
    if not any(m["role"] == "assistant" and m["content"][0].isspace() for m in messages):
      assert ids[mask > 0].tolist() == want
    else:  # a reply starting with a newline merges with the header's: that one token straddles, and is scored
      assert TOK.decode(ids[mask > 0]) == "\n" + "".join(m["content"] + "<|im_end|>" for m in messages
                                                          if m["role"] == "assistant")
    # Every special id of the rendering is a template marker: 3 per turn (start, end), the rest text.
    n_special = int((ids >= TOK.eos_id).sum())
    assert n_special == 2 * len(messages)
    assert TOK.decode(ids) == "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) \
        or any("\u0301" in m["content"] for m in messages)  # (NFC composes the combining accent)
  _, mask_all = chat.render(CONVERSATIONS[0], loss_on="all")
  assert mask_all.all()
  prompt, pmask = chat.render(CONVERSATIONS[0][:1], add_generation_prompt=True)
  assert TOK.decode(prompt) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n" and not pmask.any()


@pytest.mark.parametrize("messages,reason", [
    ({"messages": []}, "no_messages"), ({"text": "x"}, "no_messages"), ([1], "no_messages"),
    ({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}, "unknown_role"),
    ({"messages": [{"role": "user", "content": "x"}]}, "no_assistant_turn"),
    ({"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "y"}]}, "empty_content"),
    ({"messages": [{"role": "user", "content": ["x"]}, {"role": "assistant", "content": "y"}]}, "non_string_content"),
    ({"prompt": "x", "response": None}, "non_string_content"),
])
def test_bad_records_name_their_reason(messages, reason):
  with pytest.raises(chat.ChatError) as e:
    chat.messages_of(messages)
  assert e.value.reason == reason


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
  from transformers import AutoTokenizer
  out = tmp_path_factory.mktemp("hf_tok")
  save_hf_tokenizer(TOK, str(out))
  (out / "generation_config.json").write_text("{}")
  chat.write_hf_chat_files(str(out))
  assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [IM_END, TOK.eos_id]
  return AutoTokenizer.from_pretrained(out)


def hf_ids(tokenizer, messages, **kw):
  out = tokenizer.apply_chat_template(messages, tokenize=True, **kw)
  return list(out["input_ids"] if not isinstance(out, list) else out)


def test_render_equals_the_exported_tokenizers_apply_chat_template(hf_tokenizer):
  for messages in CONVERSATIONS:
    ids, _ = chat.render(messages)
    assert hf_ids(hf_tokenizer, messages) == ids.tolist()
    assert hf_ids(hf_tokenizer, messages, sanitize_control_tokens=True) == ids.tolist()
    prompt, _ = chat.render(messages[:-1], add_generation_prompt=True)
    assert hf_ids(hf_tokenizer, messages[:-1], add_generation_prompt=True) == prompt.tolist()
  for messages in WITH_SPECIALS:  # contents are text: Hugging Face's sanitize_control_tokens=True
    ids, _ = chat.render(messages)
    assert hf_ids(hf_tokenizer, messages, sanitize_control_tokens=True) == ids.tolist()
    assert hf_ids(hf_tokenizer, messages) != ids.tolist()  # the plain call would read them as markers


def test_a_custom_template_masks_what_hugging_faces_generation_tags_mark(hf_tokenizer):
  # A template with {% generation %} tags: HF's own assistant mask is the reference for our prefix method.
  template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}<|im_start|>assistant\n"
              "{% generation %}{{ m['content'] | trim }}<|im_end|>{% endgeneration %}\n{% else %}"
              "<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n{% endif %}{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
  for messages in CONVERSATIONS:
    ids, mask = chat.render(messages, template)
    ref = hf_tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True,
                                           return_assistant_tokens_mask=True)
    assert ref["input_ids"] == ids.tolist() and ref["assistant_masks"] == mask.tolist()
    assert ids[0] == TOK.eos_id  # bos_token is <|endoftext|>, as in the exported tokenizer


def write_jsonl(path, records):
  with open(path, "w") as f:
    for r in records:
      f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")


def test_pipeline_rows_carry_the_rendered_masks_mix_with_text_and_count_bad_records(tmp_path):
  good = [{"messages": m} for m in CONVERSATIONS + WITH_SPECIALS] + [{"prompt": "p?", "response": "r."}]
  bad = ["{not json", {"messages": []}, {"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]},
         {"messages": [{"role": "user", "content": "x"}]}, {"prompt": "", "response": "y"},
         {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]}]
  path = tmp_path / "chat.jsonl"
  write_jsonl(path, good[:3] + bad + good[3:])
  seq_len = 64
  cfg = DataConfig(sources=(SourceConfig(str(path), "chat", 1.0, format="chat"),), seq_len=seq_len, batch_size=1,
                   shuffle=False, prefetch=0, virtual_shards=1)
  it = data.make_train_iterator(cfg, seed=0)
  renders = [chat.render(chat.messages_of(r)) for r in good]
  stream = np.concatenate([t for t, _ in renders])
  stream_mask = np.concatenate([m for _, m in renders])
  rows = [next(it) for _ in range(stream.size // seq_len)]
  tokens = np.concatenate([r["tokens"][0] for r in rows])
  n = tokens.size
  assert np.array_equal(tokens, stream[:n])  # no EOS between conversations: the template ends each turn
  assert np.array_equal(np.concatenate([r["loss_mask"][0] for r in rows]), stream_mask[:n])
  stats = it.stats()
  for reason in ("malformed_json", "no_messages", "unknown_role", "no_assistant_turn", "empty_content",
                 "non_string_content"):
    assert stats[f"data/skipped_{reason}"] == 1, reason
  it.close()

  # Chat and plain text mixed by weight: the text rows score every token.
  mixed = DataConfig(sources=(SourceConfig(str(path), "chat", 0.5, format="chat"),
                              SourceConfig(str(SAMPLE_DIR / "en_train.jsonl"), "en", 0.5)),
                     seq_len=seq_len, batch_size=4, prefetch=0, virtual_shards=1)
  it = data.make_train_iterator(mixed, seed=0)
  batch = next(it)
  full = batch["loss_mask"].all(axis=1)
  assert full.sum() == 2 and 0 < batch["loss_mask"][~full].mean() < 1
  it.close()


def test_the_loss_counts_exactly_the_scored_targets():
  import jax.numpy as jnp
  from ar_lm_jax import loss as loss_lib
  tokens, mask = chat.render(CONVERSATIONS[2])
  tokens_BT, mask_BT = tokens[None], mask[None].astype(np.int32)
  seg_BT = np.ones_like(tokens_BT)
  targets_BT, scored_BT = loss_lib.targets_and_mask(jnp.asarray(tokens_BT), jnp.asarray(seg_BT), jnp.asarray(mask_BT))
  scored = np.asarray(scored_BT)[0]
  # Position t is scored iff token t+1 is a scored target: the predictions of each reply and its <|im_end|>.
  assert scored.tolist() == mask[1:].astype(bool).tolist() + [False]
  assert np.asarray(targets_BT)[0][scored].tolist() == tokens[mask > 0].tolist()


# ---------------------------------------------------------------------------
# An SFT run in subprocesses: 2 devices = 1 device, bitwise resume, export = evaluate.

# 1.5 epochs of the 1,774 tokens of chat_train.jsonl at 0.9 x 4 rows of 128: ceil(5.78) = 6 steps (ar_lm_jax.epochs),
# counted by the first start and taken from config.json by the resumed one.
ARGS = ["--config=sft_tiny", "--config.model.num_heads=2", "--config.model.hidden_size=16", "--config.data.seq_len=128",
        "--config.data.batch_size=4", "--config.train.epochs=1.5", "--config.train.log_every=1",
        "--config.train.eval_every=0", "--config.train.progress=false", "--config.checkpoint.every_steps=3",
        "--config.train.loss_chunk_size=32"]


@pytest.fixture(scope="module")
def run_env(tmp_path_factory):
  cache = str(tmp_path_factory.mktemp("jax_cache"))
  base = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": cache,
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}
  return lambda devices: {**base, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def sft(env, workdir, *extra):
  proc = subprocess.run([sys.executable, "-m", "experiments.train", *ARGS, f"--workdir={workdir}", *extra], env=env,
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
  assert "train.epochs=1.5: train.steps=6" in proc.stdout
  rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def reference_run(run_env, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("sft_ref")
  return workdir, sft(run_env(2), workdir, "--config.mesh.data=2")


def test_sft_on_one_device_equals_two_and_resume_is_bitwise(run_env, reference_run, tmp_path):
  _, ref = reference_run
  assert sorted(ref) == list(range(1, 7)) and ref[6]["loss"] < ref[1]["loss"]
  assert all(0 < ref[s]["scored_tokens"] < 4 * 127 for s in ref)  # only the assistant tokens (and the replay rows) count
  half = sft(run_env(2), tmp_path / "resumed", "--config.mesh.data=2", "--config.train.stop_after=3")
  assert sorted(half) == [1, 2, 3]
  resumed = sft(run_env(2), tmp_path / "resumed", "--config.mesh.data=2")
  for s in range(1, 7):
    for key in ("loss", "grad_norm", "scored_tokens", "data/batch_hash"):
      assert resumed[s][key] == ref[s][key], (s, key)
  one = sft(run_env(1), tmp_path / "one", "--config.mesh.data=1")
  for s in range(1, 7):
    assert one[s]["data/batch_hash"] == ref[s]["data/batch_hash"] and one[s]["scored_tokens"] == ref[s]["scored_tokens"]
    np.testing.assert_allclose(one[s]["loss"], ref[s]["loss"], rtol=1e-5)
    np.testing.assert_allclose(one[s]["grad_norm"], ref[s]["grad_norm"], rtol=1e-4)


def test_exported_model_masked_label_loss_equals_evaluate(reference_run, tmp_path):
  import torch
  from transformers import AutoModelForCausalLM, AutoTokenizer
  from ar_lm_jax import evaluate, hf_io
  workdir, _ = reference_run
  hf_io.export_checkpoint(workdir, tmp_path / "hf")
  lines = evaluate.evaluate_file(SAMPLE_DIR / "chat_valid.jsonl", workdir=str(workdir))
  tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
  model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
  nll, count = {}, {}
  for line in (SAMPLE_DIR / "chat_valid.jsonl").read_text().splitlines():
    record = json.loads(line)
    messages = chat.messages_of(record)
    ids = hf_ids(tokenizer, messages, sanitize_control_tokens=True)
    ours, mask = chat.render(messages)
    assert ids == ours.tolist()
    labels = torch.tensor(np.where(mask > 0, ours, -100)[None], dtype=torch.long)
    with torch.no_grad():
      out = model(torch.tensor([ids]), labels=labels)
    n = int(mask[1:].sum())
    for lang in (record["lang"], "all"):
      nll[lang] = nll.get(lang, 0.0) + float(out.loss) * n
      count[lang] = count.get(lang, 0) + n
  by_lang = {line["lang"]: line for line in lines}
  assert set(by_lang) == {"en", "ar", "all"}
  for lang, line in by_lang.items():
    assert line["tokens"] == count[lang]
    np.testing.assert_allclose(line["loss"], nll[lang] / count[lang], rtol=1e-4)


def test_generate_chat_replies_after_the_generation_prompt_and_stops_at_im_end(reference_run):
  from ar_lm_jax import generate, saved_run
  workdir, _ = reference_run
  run = saved_run.load_run(str(workdir))
  cfg = run.setup.cfg
  messages = [{"role": "user", "content": "ما عاصمة مصر؟"}]
  [reply] = generate.generate_chat(run.params, cfg.model, [messages], 12)
  prompt, _ = chat.render(messages, add_generation_prompt=True)
  # Reference: plain decoding of the rendered prompt, which runs on past <|im_end|>.
  [raw] = generate.generate(run.params, cfg.model, [prompt.tolist()], 12, eos_id=-1)
  stop = raw.index(IM_END) if IM_END in raw else len(raw)
  assert reply["tokens"] == raw[:stop] and IM_END not in reply["tokens"]
  assert reply["text"] == TOK.decode(raw[:stop])
