"""Where the train step's time goes: `python -m benchmarks.profile_step [--config=bench-cpu] [--top=25] [--config.k=v]`.

Traces a few steps with jax.profiler and prints the time per part of the step
(decoder blocks, LM head + cross-entropy, optimizer, ...) and the top XLA ops.
XLA runs independent ops concurrently, so per-op times can add up to more than
the step. The last line is a JSON object.
"""

import collections
import glob
import gzip
import json
import shutil
import tempfile
import time
from typing import Any

from ar_lm_jax import cli, startup
from ar_lm_jax.config import Config


def _thunk_ops(hlo_text: str) -> dict[str, str]:
  """Instruction name -> the JAX op path in its metadata, from a compiled module's text."""
  ops = {}
  for line in hlo_text.splitlines():
    line = line.strip()
    if line.startswith("ROOT "):
      line = line[5:]
    if not line.startswith("%") or "op_name=\"" not in line:
      continue
    name = line[1:line.index(" ")]
    ops[name] = line.split("op_name=\"", 1)[1].split("\"", 1)[0]
  return ops


def step_part(op_path: str) -> str:
  """A coarse part of the train step for a JAX op path."""
  if any(eq in op_path for eq in ("btd,dv->btv", "bcv,dv->bcd", "bcd,bcv->dv")) or (
      "while/body/closed_call" in op_path and "layers" not in op_path):
    return "LM head + cross-entropy"
  if "embed_tokens" in op_path:
    return "embedding"
  if "layers" in op_path:
    return "decoder blocks"
  if "jvp(" in op_path or "transpose(" in op_path:
    return "other forward/backward"
  return "optimizer, clipping, state update"


def profile_step(cfg: Config, reps: int = 3) -> tuple[list[dict[str, Any]], float]:
  """Per-op wall time of the compiled train step from a jax.profiler trace: (rows, mean step seconds).

  Rows are sorted by total time: op (the XLA thunk), jax op path, part, ms per step, calls per step.
  Thunks that XLA runs concurrently overlap, so the ms can add up to more than the step.
  """
  import jax  # after main's startup.start: the GPU flags are set first

  from ar_lm_jax import aot, sharding
  from ar_lm_jax import step as step_lib
  from benchmarks.train_step import synthetic_batch

  setup = step_lib.build(cfg)
  with setup.activate():
    compiled = aot.compile_fn(step_lib.jit_train_step(setup), setup.abstract_state, step_lib.abstract_batch(cfg))
  ops = _thunk_ops(compiled.compiled.as_text())
  state = step_lib.init_state(setup, cfg.train.seed)
  batch = sharding.global_batch(synthetic_batch(cfg.data.batch_size, cfg.data.seq_len, min(cfg.model.vocab_size, 100289)),
                                setup.mesh)
  state, _ = compiled(state, batch)
  jax.block_until_ready(state)
  tmp = tempfile.mkdtemp()
  try:
    t = time.perf_counter()
    with jax.profiler.trace(tmp):
      for _ in range(reps):
        state, _ = compiled(state, batch)
        jax.block_until_ready(state)
    step_s = (time.perf_counter() - t) / reps
    traces = glob.glob(f"{tmp}/**/*.trace.json.gz", recursive=True)
    events = json.load(gzip.open(traces[0]))["traceEvents"] if traces else []
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  total, calls = collections.Counter(), collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e.get("name") in ops:
      total[e["name"]] += e["dur"]
      calls[e["name"]] += 1
  rows = [{"op": n, "jax_op": ops[n], "part": step_part(ops[n]), "ms": us / 1e3 / reps, "calls": calls[n] // reps}
          for n, us in total.most_common()]
  return rows, step_s


def main() -> int:
  p = cli.make_parser(__doc__, default_config="bench-cpu")
  p.add_argument("--top", type=int, default=25, help="ops listed")
  p.add_argument("--reps", type=int, default=3, help="profiled steps")
  cfg, args = cli.parse_args(p)
  if args.top < 0 or args.reps < 1:
    raise cli.UsageError("--top must be >= 0 and --reps >= 1")

  startup.start(multiprocess=False)
  rows, step_s = profile_step(cfg, reps=args.reps)
  op_ms = sum(r["ms"] for r in rows)
  parts = collections.Counter()
  for r in rows:
    parts[r["part"]] += r["ms"]
  print(f"{cfg.name}: {step_s * 1e3:.0f} ms per step (profiled); per-op times sum to {op_ms:.0f} ms")
  for part, ms in parts.most_common():
    print(f"  {part:36s} {ms:8.1f} ms  {ms / op_ms:6.1%}")
  print(f"top {args.top} ops:")
  for r in rows[:args.top]:
    print(f"  {r['ms']:8.1f} ms {r['ms'] / op_ms:6.1%}  x{r['calls']:<3d} {r['op'][:28]:28s} {r['jax_op'][-80:]}")
  print(json.dumps({"config": cfg.name, "step_ms": step_s * 1e3, "op_ms": op_ms, "parts_ms": dict(parts)}))
  return 0


if __name__ == "__main__":
  cli.run_main(main)
