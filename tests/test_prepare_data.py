"""Tests for ar_lm_jax.prepare_data and tools/prepare_data.py: shards, manifest, resume, errors."""

from __future__ import annotations

import json
import os

import grain
import numpy as np
import pytest
import zstandard

from ar_lm_jax import cli
from ar_lm_jax.config import ConfigError, SourceConfig
from ar_lm_jax.data_sources import MANIFEST, SKIP_REASONS
from ar_lm_jax.prepare_data import prepare_data
from ar_lm_jax.tokenizer import load_tokenizer
from tools import prepare_data as prepare_tool

DOCS = [f"Document {i}: " + "مرحبا بالعالم " * (i % 5) + "hello world " * (i % 3) for i in range(60)]
BAD = b'{broken\n{"text": ""}\n{"title": "x"}\n'


@pytest.fixture
def corpus(tmp_path):
  d = tmp_path / "in"
  d.mkdir()
  lines = [json.dumps({"text": t}, ensure_ascii=False).encode() + b"\n" for t in DOCS]
  (d / "a.jsonl").write_bytes(b"".join(lines[:30]) + BAD)
  (d / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b"".join(lines[30:])))
  return d


def read_shards(out_dir):
  manifest = json.loads((out_dir / MANIFEST).read_text())
  paths = [str(out_dir / name) for name in sorted(manifest["shards"])]
  src = grain.sources.ArrayRecordDataSource(paths)
  return manifest, [np.frombuffer(src[i], "<i4").tolist() for i in range(len(src))]


def test_shards_hold_the_tokenized_documents(corpus, tmp_path):
  out = tmp_path / "out"
  manifest = prepare_data(SourceConfig(str(corpus), "x"), str(out), shards_per_file=2, progress=False)
  tok = load_tokenizer()
  expected = sorted(tok.encode(t) for t in DOCS)
  on_disk, records = read_shards(out)
  assert sorted(records) == expected
  assert len(manifest["shards"]) == 4 and on_disk["shards"] == manifest["shards"]
  assert manifest["documents"] == 60 and manifest["tokens"] == sum(map(len, expected))
  assert manifest["skipped"] == {**{r: 0 for r in SKIP_REASONS}, "malformed_json": 1, "empty": 1, "missing_field": 1}
  assert manifest["tokenizer"]["eos_id"] == tok.eos_id
  assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_rerun_resumes_only_missing_shards(corpus, tmp_path):
  out = tmp_path / "out"
  first = prepare_data(SourceConfig(str(corpus), "x"), str(out), shards_per_file=2, progress=False)
  # Simulate an interruption: one shard never finished (not in the manifest, a stray .tmp left).
  manifest = json.loads((out / MANIFEST).read_text())
  lost = sorted(manifest["shards"])[1]
  del manifest["shards"][lost]
  (out / MANIFEST).write_text(json.dumps(manifest))
  (out / lost).rename(out / (lost + ".tmp"))
  mtimes = {n: os.stat(out / n).st_mtime_ns for n in manifest["shards"]}
  again = prepare_data(SourceConfig(str(corpus), "x"), str(out), progress=False)  # shards_per_file from the manifest
  assert again == first
  assert {n: os.stat(out / n).st_mtime_ns for n in manifest["shards"]} == mtimes  # the others were not redone
  assert os.path.exists(out / lost) and not os.path.exists(out / (lost + ".tmp"))


def test_mismatched_output_directory_is_a_config_error(corpus, tmp_path):
  out = tmp_path / "out"
  prepare_data(SourceConfig(str(corpus / "a.jsonl"), "x"), str(out), progress=False)
  with pytest.raises(ConfigError, match="different|made with"):
    prepare_data(SourceConfig(str(corpus / "b.jsonl.zst"), "x"), str(out), progress=False)
  with pytest.raises(ConfigError, match="shards_per_file"):
    prepare_data(SourceConfig(str(corpus / "a.jsonl"), "x"), str(out), shards_per_file=3, progress=False)
  with pytest.raises(ConfigError, match="path matches no files"):
    prepare_data(SourceConfig(str(tmp_path / "none*.jsonl"), "x"), str(tmp_path / "o2"), progress=False)


def test_command_line(corpus, tmp_path, capsys):
  out = tmp_path / "out"
  assert prepare_tool.main([f"--input={corpus}", f"--output={out}", "--workers=1", "--no_progress"]) == 0
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert summary["documents"] == 60 and summary["shards"] == 2
  with pytest.raises(SystemExit) as e:
    cli.run_main(lambda: prepare_tool.main([f"--input={tmp_path}/nothing*", f"--output={out}"]))
  assert e.value.code == 2
  assert "path matches no files" in capsys.readouterr().err


@pytest.mark.skipif(not os.environ.get("AR_LM_SLOW_TESTS"), reason="spawns worker processes; set AR_LM_SLOW_TESTS=1")
def test_parallel_workers_write_the_same_shards(corpus, tmp_path):
  one = prepare_data(SourceConfig(str(corpus), "x"), str(tmp_path / "one"), shards_per_file=2, progress=False)
  two = prepare_data(SourceConfig(str(corpus), "x"), str(tmp_path / "two"), num_workers=2, shards_per_file=2,
                     progress=False)
  assert one["shards"] == two["shards"]
  assert read_shards(tmp_path / "one")[1] == read_shards(tmp_path / "two")[1]


def test_a_chat_source_is_refused_with_one_line_and_nothing_written(tmp_path, capsys):
  # Pre-tokenized records are ids only: a chat corpus would lose its loss mask, so it is refused up front.
  chat_file = tmp_path / "chat.jsonl"
  chat_file.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                {"role": "assistant", "content": "hello"}]}) + "\n")
  out = tmp_path / "out"
  with pytest.raises(SystemExit) as e:
    cli.run_main(lambda: prepare_tool.main([f"--input={chat_file}", f"--output={out}", "--format=chat", "--no_progress"]))
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "chat source" in err[0] and "loss mask" in err[0] and 'format "chat"' in err[0], err
  assert not out.exists()
  with pytest.raises(ConfigError, match="chat source"):
    prepare_data(SourceConfig(path=str(chat_file), lang="chat", format="chat"), str(out))
