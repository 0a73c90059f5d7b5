"""Log-likelihood requests per second: the `ar_lm_jax` lm-eval backend against lm-eval's `hf` backend.

  python -m benchmarks.harness_speed [--workdir=W] [--requests=512] [--shots=3] [--batch_size=8]

Both backends answer the same multiple-choice requests (the questions of
tests/harness_tasks/mc_{en,ar}.jsonl as `--shots`-shot prompts, every request made
distinct so neither side can reuse a result) on this machine's CPU: ours on the
checkpoint in W, lm-eval's HF backend (PyTorch, float32) on its export. Without
--workdir a `tiny` run (the real 100352-row vocab) is trained for 2 steps into a
temporary directory. Each side answers a warm-up batch first (our compilations,
torch's first calls), then the timed requests. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The test tasks live in the checkout, beside this script, not in the package.
TASKS_DIR = Path(__file__).resolve().parents[1] / "tests" / "harness_tasks"


class Req:
  """What a backend reads of an lm-eval Instance."""

  def __init__(self, context: str, continuation: str):
    self.args = (context, continuation)


def make_requests(n: int, shots: int, seed: int = 0) -> list[Req]:
  docs = []
  for name, (q, a) in (("mc_en.jsonl", ("Question", "Answer")), ("mc_ar.jsonl", ("سؤال", "الجواب"))):
    for line in (TASKS_DIR / name).read_text().splitlines():
      d = json.loads(line)
      docs.append((f"{q}: {d['question']}\n{a}:", d["choices"], d["answer"]))
  rng = random.Random(seed)
  out = []
  while len(out) < n:
    prompt, choices, _ = docs[len(out) // 4 % len(docs)]
    shots_text = "".join(f"{p} {c[t]}\n\n" for p, c, t in rng.sample(docs, shots))
    context = f"#{len(out)}\n{shots_text}{prompt}"  # the number makes every request distinct
    out += [Req(context, " " + c) for c in choices]
  return out[:n]


def timed(fn, requests) -> float:
  t0 = time.perf_counter()
  fn(requests)
  return time.perf_counter() - t0


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", default=None, help="a run's workdir (default: a 2-step tiny run in a temporary directory)")
  p.add_argument("--requests", type=int, default=512, help="timed loglikelihood requests per backend")
  p.add_argument("--shots", type=int, default=3, help="examples before each question (longer contexts)")
  p.add_argument("--batch_size", type=int, default=8, help="rows per batch (ours) and requests per batch (HF)")
  args = p.parse_args()

  from ar_lm_jax import startup
  startup.start(multiprocess=False)  # the GPU flags, before jax starts a backend
  from ar_lm_jax import harness, hf_io, loop
  tmp = Path(tempfile.mkdtemp(prefix="harness_speed_"))
  workdir = args.workdir
  if workdir is None:
    from ar_lm_jax.config import load_config, override
    cfg = load_config("tiny")
    for key, value in (("train.steps", 2), ("train.eval_every", 0), ("train.progress", False), ("checkpoint.async_save", False)):
      cfg = override(cfg, key, value)
    workdir = tmp / "run"
    loop.run(cfg, workdir)
  hf_io.export_checkpoint(workdir, tmp / "hf")

  warm, requests = make_requests(args.batch_size * 4, args.shots, seed=1), make_requests(args.requests, args.shots)
  ours = harness.ArLmJax(pretrained=str(workdir), batch_size=args.batch_size)
  t_warm = timed(lambda r: ours.loglikelihood(r, disable_tqdm=True), warm)
  t_ours = timed(lambda r: ours.loglikelihood(r, disable_tqdm=True), requests)

  import torch
  from lm_eval.models.huggingface import HFLM
  hf = HFLM(pretrained=str(tmp / "hf"), dtype="float32", device="cpu", batch_size=args.batch_size)
  timed(lambda r: hf.loglikelihood(r, disable_tqdm=True), warm)
  t_hf = timed(lambda r: hf.loglikelihood(r, disable_tqdm=True), requests)

  lengths = [len(ours.tok_encode(r.args[0] + r.args[1])) for r in requests]
  result = {"requests": len(requests), "mean_tokens": sum(lengths) / len(lengths), "batch_size": args.batch_size,
            "ours_requests_per_sec": len(requests) / t_ours, "hf_requests_per_sec": len(requests) / t_hf,
            "speedup": t_hf / t_ours, "ours_warmup_s": t_warm, "torch_threads": torch.get_num_threads(),
            "model_params": ours.get_model_info()["model_num_parameters"], "workdir": str(workdir)}
  print(f"ar_lm_jax {result['ours_requests_per_sec']:.1f} requests/s, lm-eval hf {result['hf_requests_per_sec']:.1f} "
        f"requests/s ({result['speedup']:.2f}x), {len(requests)} requests of {result['mean_tokens']:.0f} tokens on average")
  print(json.dumps(result))


if __name__ == "__main__":
  main()
