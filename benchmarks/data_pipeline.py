"""Throughput of the training input pipeline, on-the-fly and pre-tokenized, per CPU core.

  python -m benchmarks.data_pipeline [--mb=8] [--seq_len=4096] [--batch_size=8] [--batches=60] [--virtual_shards=0]

Writes a synthetic bilingual corpus (Zipf-weighted English and Arabic word lists plus made-up rare
words, numbers and punctuation; log-normal document lengths) into a temp dir, then times in this process, with no prefetch thread
and no worker processes:

  on-the-fly     JSONL (.zst for Arabic) -> parse -> tokenize -> pack -> mix -> batch
  pre-tokenized  ArrayRecord shards (written by prepare_data) -> decode -> pack -> mix -> batch

All virtual shards of the data order (`data.virtual_shards`, default gcd(batch_size, 16)) run in this
process, as in a single-process run. "per core" is tokens per CPU-second of this process (tiktoken's batch encoder runs on threads,
so wall-clock tokens/s can exceed it on a multi-core machine). Targets: 300k tokens/s per core
on the fly, 2M tokens/s per core pre-tokenized. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import zstandard

from ar_lm_jax import data
from ar_lm_jax.config import DataConfig, SourceConfig
from ar_lm_jax.prepare_data import prepare_data

EN_WORDS = """the of and to a in is it you that he was for on are with as his they be at one have this from
or had by hot word but what some we can out other were all there when up use your how said an each she
which do their time if will way about many then them write would like so these her long make thing see
him two has look more day could go come did number sound no most people my over know water than call
first who may down side been now find any new work part take get place made live where after back
little only round man year came show every good me give our under name very through just form sentence
great think say help low line differ turn cause much mean before move right boy old too same tell does
set three want air well also play small end put home read hand port large spell add even land here must
big high such follow act why ask men change went light kind off need house picture try us again animal
point mother world near build self earth father head stand own page should country found answer school
grow study still learn plant cover food sun four between state keep eye never last let thought city tree
cross farm hard start might story saw far sea draw left late run while press close night real life few
north open seem together next white children begin got walk example ease paper group always music those
both mark often letter until mile river car feet care second book carry took science eat room friend
began idea fish mountain stop once base hear horse cut sure watch color face wood main enough plain girl
usual young ready above ever red list though feel talk bird soon body dog family direct pose leave song
measure door product black short numeral class wind question happen complete ship area half rock order
fire south problem piece told knew pass since top whole king space heard best hour better true during
hundred five remember step early hold west ground interest reach fast verb sing listen six table travel
less morning ten simple several vowel toward war lay against pattern slow center love person money serve
appear road map rain rule govern pull cold notice voice unit power town fine certain fly fall lead cry
dark machine note wait plan figure star box noun field rest correct able pound done beauty drive stood
contain front teach week final gave green oh quick develop ocean warm free minute strong special mind
behind clear tail produce fact street inch multiply nothing course stay wheel full force blue object
decide surface deep moon island foot system busy test record boat common gold possible plane stead dry
wonder laugh thousand ago ran check game shape equate miss brought heat snow tire bring yes distant fill
east paint language among grand ball yet wave drop heart present heavy dance engine position arm wide
sail material size vary settle speak weight general ice matter circle pair include divide syllable felt
perhaps pick sudden count square reason length represent art subject region energy hunt probable bed
brother egg ride cell believe fraction forest sit race window store summer train sleep prove lone leg
exercise wall catch mount wish sky board joy winter sat written wild instrument kept glass grass cow job
edge sign visit past soft fun bright gas weather month million bear finish happy hope flower clothe
strange gone jump baby eight village meet root buy raise solve metal whether push seven paragraph third
shall held hair describe cook floor either result burn hill safe cat century consider type law bit coast
copy phrase silent tall sand soil roll temperature finger industry value fight lie beat excite natural
view sense ear else quite broke case middle kill son lake moment scale loud spring observe child straight
consonant nation dictionary milk speed method organ pay age section dress cloud surprise quiet stone tiny
climb cool design poor lot experiment bottom key iron single stick flat twenty skin smile crease hole
""".split()

AR_WORDS = """في من على إلى أن هذا التي الذي كان عن مع ما هو لا قد كل بين بعد وقد هذه عند ذلك حيث أو
لم ثم كما أي منذ حتى إذا لكن غير أكثر خلال يكون كانت بعض فيها به له عليه الله إن تم بن هي وهو وفي
العالم الدولة المدينة الحكومة الناس العربية الكتاب التاريخ الماء الأرض الشمس البحر الجامعة الطالب
المعلم المدرسة البيت السيارة الطريق العمل الوقت اليوم السنة الشهر الأسبوع الليل النهار الصباح المساء
كبير صغير جديد قديم جميل طويل قصير سريع بطيء قوي ضعيف كثير قليل أول آخر ثاني عربي دولي وطني محلي
يقول قال كتب قرأ ذهب جاء رأى سمع عرف فهم تعلم درس عمل أكل شرب نام جلس وقف مشى ركض فتح أغلق بدأ انتهى
الاقتصاد السياسة الثقافة العلوم الرياضة الصحة التعليم الزراعة الصناعة التجارة السياحة الفن الموسيقى
الشعر الأدب اللغة الدين الفلسفة الطب الهندسة الحاسوب الإنترنت الهاتف الأخبار الصحيفة المجلة البرنامج
""".split()


def _zipf_words(words: list[str], alphabet: str, n: int, rng: np.random.Generator) -> str:
  """Zipf-weighted common words, plus 15% rare made-up words, numbers and punctuation (harder for BPE)."""
  p = 1.0 / np.arange(1, len(words) + 1)
  idx = rng.choice(len(words), size=n, p=p / p.sum())
  out = []
  for i, u in zip(idx, rng.random(n)):
    if u < 0.12:
      out.append("".join(rng.choice(list(alphabet), size=rng.integers(3, 12))))
    elif u < 0.15:
      out.append(str(rng.integers(0, 100000)))
    else:
      out.append(words[i])
    if u > 0.93:
      out[-1] += "." if u > 0.97 else ","
  return " ".join(out)


def write_corpus(directory: str, mb: float, seed: int = 0) -> dict[str, str]:
  """`mb` MB of JSONL per language (en plain, ar zstd-compressed); returns lang -> path."""
  rng = np.random.default_rng(seed)
  paths = {}
  for lang, words, compress in (("en", EN_WORDS, False), ("ar", AR_WORDS, True)):
    alphabet = "".join(sorted(set("".join(words))))
    lines, size = [], 0
    while size < mb * 1e6:
      n = int(np.clip(rng.lognormal(5.5, 0.8), 5, 5000))
      line = json.dumps({"text": _zipf_words(words, alphabet, n, rng), "lang": lang}, ensure_ascii=False) + "\n"
      lines.append(line)
      size += len(line.encode())
    raw = "".join(lines).encode()
    path = os.path.join(directory, f"{lang}.jsonl" + (".zst" if compress else ""))
    with open(path, "wb") as f:
      f.write(zstandard.ZstdCompressor().compress(raw) if compress else raw)
    paths[lang] = path
  return paths


def measure(cfg: DataConfig, batches: int, warmup: int = 3) -> dict[str, float]:
  it = data.make_train_iterator(cfg, seed=0)
  for _ in range(warmup):
    next(it)
  wall, cpu = time.perf_counter(), time.process_time()
  for _ in range(batches):
    next(it)
  wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
  it.close()
  tokens = batches * cfg.batch_size * cfg.seq_len
  return {"tokens_per_sec": tokens / wall, "tokens_per_cpu_sec": tokens / cpu, "tokens": tokens}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--mb", type=float, default=8.0, help="MB of text per language")
  p.add_argument("--seq_len", type=int, default=4096)
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--batches", type=int, default=60, help="timed batches per run")
  p.add_argument("--virtual_shards", type=int, default=0, help="data.virtual_shards (0: gcd(batch_size, 16))")
  args = p.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    t = time.perf_counter()
    paths = write_corpus(tmp, args.mb)
    print(f"wrote {2 * args.mb:.0f} MB of synthetic JSONL in {time.perf_counter() - t:.1f}s")
    common = dict(seq_len=args.seq_len, batch_size=args.batch_size, prefetch=0, worker_count=0, shuffle_window=1024,
                  virtual_shards=args.virtual_shards)
    on_the_fly = DataConfig(sources=(SourceConfig(paths["en"], "en", 0.8), SourceConfig(paths["ar"], "ar", 0.2)),
                            **common)
    t = time.perf_counter()
    shards = {}
    for lang, path in paths.items():
      shards[lang] = os.path.join(tmp, f"{lang}_tok")
      prepare_data(SourceConfig(path, lang), shards[lang], num_workers=1, progress=False)
    print(f"pre-tokenized both with prepare_data in {time.perf_counter() - t:.1f}s")
    pretok = DataConfig(sources=(SourceConfig(shards["en"], "en", 0.8), SourceConfig(shards["ar"], "ar", 0.2)),
                        **common)
    results = {"on_the_fly": measure(on_the_fly, args.batches), "pre_tokenized": measure(pretok, args.batches)}
  targets = {"on_the_fly": 3e5, "pre_tokenized": 2e6}
  for name, r in results.items():
    ok = "ok" if r["tokens_per_cpu_sec"] >= targets[name] else "BELOW TARGET"
    print(f"{name:>14}: {r['tokens_per_cpu_sec'] / 1e6:6.2f}M tokens/s per core "
          f"({r['tokens_per_sec'] / 1e6:.2f}M tokens/s wall), target {targets[name] / 1e6:.1f}M: {ok}")
  print(json.dumps({"config": vars(args), "cpu_count": os.cpu_count(), **results}))


if __name__ == "__main__":
  main()
