"""Tests for ar_lm_jax.data: the whole pipeline (formats, mixture, stages, resume, hosts) and tools.inspect_data."""

from __future__ import annotations

import dataclasses
import gzip
import json
import os

import grain
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from ar_lm_jax import batch as batch_lib
from ar_lm_jax import cli, data
from ar_lm_jax.config import Config, ConfigError, DataConfig, MixtureStage, SourceConfig, apply_overrides
from ar_lm_jax.prepare_data import prepare_data
from ar_lm_jax.tokenizer import load_tokenizer
from tools import inspect_data

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()
AR_WORDS = "في من على إلى أن هذا التي الذي كان عن مع".split()


def texts(tag, n, words=WORDS, seed=0):
  rng = np.random.default_rng(seed)
  return [f"{tag} {i} " + " ".join(rng.choice(words, size=rng.integers(3, 60))) for i in range(n)]


def write_jsonl(path, docs, extra=b""):
  raw = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs).encode() + extra
  if str(path).endswith(".gz"):
    raw = gzip.compress(raw)
  elif str(path).endswith(".zst"):
    raw = zstandard.ZstdCompressor().compress(raw)
  path.write_bytes(raw)
  return str(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  d = tmp_path_factory.mktemp("corpus")
  write_jsonl(d / "en-0.jsonl", texts("en", 150))
  write_jsonl(d / "en-1.jsonl", texts("en", 150, seed=1))
  write_jsonl(d / "ar.jsonl", texts("ar", 200, AR_WORDS))
  return d


def cfg_for(*sources, **kw):
  # 2 virtual shards keep these tests fast; tests/test_data_order.py and the inspect_data test use more.
  kw = {"seq_len": 16, "batch_size": 8, "prefetch": 0, "virtual_shards": 2, **kw}
  return DataConfig(sources=tuple(sources), **kw)


def batches(it, n):
  return [next(it) for _ in range(n)]


def assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys() == set(batch_lib.KEYS)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_all_formats_end_to_end(tmp_path):
  tok = load_tokenizer()
  (tmp_path / "txt").mkdir()
  sources = [
      SourceConfig(write_jsonl(tmp_path / "a.jsonl", texts("zqplain", 30)), "plain"),
      SourceConfig(write_jsonl(tmp_path / "b.jsonl.gz", texts("zqgzip", 30)), "gz"),
      SourceConfig(write_jsonl(tmp_path / "c.jsonl.zst", texts("zqzstd", 30)), "zst"),
      SourceConfig(str(tmp_path / "d.parquet"), "parquet", text_field="body"),
      SourceConfig(str(tmp_path / "txt" / "*.txt"), "text"),
      SourceConfig(str(tmp_path / "shards"), "arrayrecord"),
  ]
  pq.write_table(pa.table({"body": texts("zqparquet", 30)}), tmp_path / "d.parquet")
  (tmp_path / "txt" / "e.txt").write_text("\n".join(texts("zqtext", 30)) + "\n")
  prepare_data(SourceConfig(write_jsonl(tmp_path / "f.jsonl", texts("zqarray", 30)), "x"), str(tmp_path / "shards"),
               progress=False)
  it = data.make_train_iterator(cfg_for(*sources, batch_size=12), seed=0)
  seen = tok.decode(np.concatenate([b["tokens"].ravel() for b in batches(it, 40)]))
  for tag in ("zqplain", "zqgzip", "zqzstd", "zqparquet", "zqtext", "zqarray"):
    assert f"{tag} " in seen
  stats = it.stats()
  assert all(stats[f"data/tokens_{s.lang}"] == 40 * 2 * 16 for s in sources)  # equal weights: 2 rows each
  it.close()


def test_batches_are_packed_rows(corpus):
  eos = load_tokenizer().eos_id
  it = data.make_train_iterator(cfg_for(SourceConfig(str(corpus / "ar.jsonl"), "ar"), seq_len=64), seed=0)
  for b in batches(it, 5):
    assert all(v.shape == (8, 64) and v.dtype == np.int32 for v in b.values())
    seg, pos, tok = b["segment_ids"], b["positions"], b["tokens"]
    assert (seg[:, 0] == 1).all() and (pos[:, 0] == 0).all() and (seg > 0).all()
    new_doc = np.diff(seg, axis=1) == 1
    np.testing.assert_array_equal(new_doc, tok[:, :-1] == eos)  # EOS ends its document's segment
    np.testing.assert_array_equal(pos[:, 1:], np.where(new_doc, 0, pos[:, :-1] + 1))
  assert it.stats()["data/padding_fraction"] == 0.0
  it.close()


def test_mixture_token_share_within_one_percent(corpus):
  cfg = cfg_for(SourceConfig(str(corpus / "en-*.jsonl"), "en", 0.843), SourceConfig(str(corpus / "ar.jsonl"), "ar", 0.157),
                batch_size=100, prefetch=2)
  it = data.make_train_iterator(cfg, seed=3)
  batches(it, 100)  # 10,000 rows
  stats = it.stats()
  assert stats["data/tokens_en"] + stats["data/tokens_ar"] == 10_000 * 16
  assert abs(stats["data/token_share_en"] - 0.843) < 0.01
  assert abs(stats["data/token_share_ar"] - 0.157) < 0.01
  it.close()


def _per_batch_tokens(it, n):
  out, prev = [], it.stats()
  for _ in range(n):
    next(it)
    cur = it.stats()
    out.append({lang: cur[f"data/tokens_{lang}"] - prev.get(f"data/tokens_{lang}", 0) for lang in ("en", "ar")})
    prev = cur
  return out


def staged_cfg(corpus, **kw):
  return cfg_for(SourceConfig(str(corpus / "en-*.jsonl"), "en", 0.5), SourceConfig(str(corpus / "ar.jsonl"), "ar", 0.5),
                 stages=(MixtureStage(3, {"en": 0.75, "ar": 0.25}), MixtureStage(6, {"ar": 1.0})), **kw)


def test_staged_mixture_changes_weights_at_steps(corpus):
  it = data.make_train_iterator(staged_cfg(corpus), seed=0)
  per_batch = _per_batch_tokens(it, 8)
  row = 16
  assert [b["en"] // row for b in per_batch[:3]] == [4, 4, 4]  # steps 0-2: the sources' own weights
  assert [b["en"] // row for b in per_batch[3:6]] == [6, 6, 6]  # steps 3-5: en 0.75
  assert [b["en"] for b in per_batch[6:]] == [0, 0]  # from step 6: Arabic only
  assert it.configured_shares() == {"en": 0.0, "ar": 1.0}
  it.close()


@pytest.mark.parametrize("k", [2, 5])  # resume just before a stage change, and within a stage
def test_resume_reproduces_following_batches(corpus, k):
  cfg = staged_cfg(corpus, prefetch=2)
  it = data.make_train_iterator(cfg, seed=7)
  batches(it, k)
  state = json.loads(json.dumps(it.get_state()))  # the state is plain JSON
  stats = it.stats()
  expected = batches(it, 6)
  it.close()
  again = data.make_train_iterator(cfg, seed=7)
  again.set_state(state)
  assert again.step == k and again.stats() == {s: v for s, v in stats.items() if s != "data/batch_hash"}
  assert_same(batches(again, 6), expected)
  again.close()


def test_orbax_saves_the_iterator_per_process(corpus, tmp_path):
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  cfg = staged_cfg(corpus)
  it = data.make_train_iterator(cfg, seed=1)
  batches(it, 4)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
  expected = batches(it, 3)
  it.close()
  again = data.make_train_iterator(cfg, seed=1)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.restore(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(again)))
  assert os.path.exists(tmp_path / "ckpt" / "4" / "data" / "process_0-of-1.json")
  assert_same(batches(again, 3), expected)
  again.close()


def test_same_seed_same_batches_other_seed_other_batches(corpus):
  cfg = cfg_for(SourceConfig(str(corpus / "en-*.jsonl"), "en"), SourceConfig(str(corpus / "ar.jsonl"), "ar"))
  runs = []
  for seed in (5, 5, 6):
    it = data.make_train_iterator(cfg, seed=seed)
    runs.append(batches(it, 4))
    it.close()
  assert_same(runs[0], runs[1])
  assert not np.array_equal(runs[0][0]["tokens"], runs[2][0]["tokens"])


def test_processes_read_disjoint_shards(tmp_path):
  # Pre-tokenized documents whose ids name them: document i is [i, i, ...].
  shards = tmp_path / "shards"
  from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=import-outside-toplevel
  shards.mkdir()
  w = ArrayRecordWriter(str(shards / "a.array_record"), "group_size:1")
  for i in range(1, 201):
    w.write(np.full(1 + i % 9, i, "<i4").tobytes())
  w.close()
  cfg = cfg_for(SourceConfig(str(shards), "en"))
  seen = []
  for p in range(2):
    it = data.make_train_iterator(cfg, seed=0, process_index=p, process_count=2)
    got = batches(it, 6)
    assert got[0]["tokens"].shape == (4, 16)
    toks = np.concatenate([b["tokens"].ravel() for b in got])
    seen.append(set(toks[toks != load_tokenizer().eos_id].tolist()))
    it.close()
  assert seen[0] and seen[1] and not seen[0] & seen[1]


def test_bad_records_are_counted_once_however_often_they_are_read(tmp_path):
  bad = b'{broken\n{"title": "no text"}\n{"text": ""}\n{"text": "caf\xe9"}\n'
  path = write_jsonl(tmp_path / "a.jsonl", texts("en", 20), extra=bad)
  # No shuffle: the counts travel with the data, and a shuffle window could hold them back for a while.
  it = data.make_train_iterator(cfg_for(SourceConfig(path, "en"), shuffle=False), seed=0)
  batches(it, 30)  # several epochs of every virtual shard
  stats = it.stats()
  assert stats["data/epochs_0_en"] > 3
  for reason in ("malformed_json", "missing_field", "empty", "invalid_utf8"):
    assert stats[f"data/skipped_{reason}"] == 1, reason  # one bad record of each kind in the file
  assert stats["data/skipped_truncated_file"] == 0
  it.close()


def test_epochs_per_source_and_a_warning_when_a_source_repeats_at_once(tmp_path, capsys):
  tiny = write_jsonl(tmp_path / "tiny.jsonl", ["just five tokens here"] * 2)  # one short document per virtual shard
  docs = texts("en", 400)
  big = write_jsonl(tmp_path / "big.jsonl", docs)
  cfg = cfg_for(SourceConfig(big, "en"), SourceConfig(tiny, "ar"), shuffle=False, virtual_shards=2)
  with pytest.raises(ConfigError, match=r"data.sources\[1\] .*holds 2 usable document\(s\), fewer than the 4 virtual"):
    data.make_train_iterator(dataclasses.replace(cfg, virtual_shards=4), seed=0)
  it = data.make_train_iterator(cfg, seed=0)
  batches(it, 10)
  stats = it.stats()
  err = capsys.readouterr().err
  assert err.count("repeats within its first rows") == 1 and "data.sources[1] (lang=ar" in err
  # The tiny source is read through dozens of times; the big one about as far as its rows have come.
  assert stats["data/epochs_1_ar"] > 30
  tok = load_tokenizer()
  per_pass = sum(len(tok.encode(d)) + 1 for d in docs)
  consumed = stats["data/tokens_en"] / per_pass
  # Completed passes, counted as they are read (a little ahead of the rows): within one of the rows' progress.
  assert consumed - 1.0 <= stats["data/epochs_0_en"] <= consumed + 1.0 and consumed > 0.02
  batches(it, 10)
  assert "repeats" not in capsys.readouterr().err  # once
  it.close()


def test_startup_errors_are_config_errors(corpus):
  with pytest.raises(ConfigError, match=r"data.sources\[1\] \(lang=ar.*matches no files"):
    data.make_train_iterator(cfg_for(SourceConfig(str(corpus / "en-0.jsonl"), "en"),
                                     SourceConfig(str(corpus / "missing-*.jsonl"), "ar")), seed=0)
  with pytest.raises(ConfigError, match="virtual shards do not split over 3 processes"):
    data.make_train_iterator(cfg_for(SourceConfig(str(corpus / "en-0.jsonl"), "en")), seed=0, process_count=3)
  with pytest.raises(ConfigError, match="must be one of"):
    apply_overrides(Config(), {"data.sources": '[{"path": "x", "lang": "en", "format": "csv"}]'})


def test_inspect_data_tool(corpus, capsys):
  sources = json.dumps([{"path": str(corpus / "en-*.jsonl"), "lang": "en", "weight": 0.75},
                        {"path": str(corpus / "ar.jsonl"), "lang": "ar", "weight": 0.25}])
  argv = ["--config=tiny", f"--config.data.sources={sources}", "--config.data.seq_len=32", "--batches=4"]
  assert inspect_data.main(argv) == 0
  report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert report["token_share"] == {"ar": 0.25, "en": 0.75} == report["configured_share"]
  assert set(report["skipped"]) >= {"malformed_json", "missing_field", "empty", "invalid_utf8"}
  assert report["padding_fraction"] == 0.0 and report["tokens_per_sec"] > 0
  assert set(report["epochs"]) == {"0_en", "1_ar"} and all(e > 0 for e in report["epochs"].values())
  assert report["virtual_shards"] == 8
  with pytest.raises(SystemExit) as e:
    cli.run_main(lambda: inspect_data.main(["--config=tiny", '--config.data.sources=[{"path": "/nope", "lang": "en"}]']))
  assert e.value.code == 2


@pytest.mark.skipif(not os.environ.get("AR_LM_SLOW_TESTS"), reason="spawns grain worker processes (~20 s); "
                    "set AR_LM_SLOW_TESTS=1")
def test_worker_processes_are_deterministic_and_resumable(corpus):
  # 2 virtual shards x 2 sources: 4 streams, each with its own worker process.
  cfg = dataclasses.replace(staged_cfg(corpus), worker_count=1, virtual_shards=2)
  it = data.make_train_iterator(cfg, seed=0)
  first = batches(it, 3)
  state = it.get_state()
  expected = batches(it, 4)
  it.close()
  again = data.make_train_iterator(cfg, seed=0)
  assert_same(batches(again, 3), first)
  again.set_state(state)
  assert_same(batches(again, 4), expected)
  again.close()
