"""Where the train step's time goes: `python -m benchmarks.profile_step [--config=bench-cpu] [--top=25] [--config.k=v]`.

Traces a few steps with jax.profiler and prints the time per part of the step
(decoder blocks, LM head + cross-entropy, optimizer, ...) and the top XLA ops.
XLA runs independent ops concurrently, so per-op times can add up to more than
the step. The last line is a JSON object.
"""

import collections
import json

from ar_lm_jax import cli


def main() -> int:
  p = cli.make_parser(__doc__, default_config="bench-cpu")
  p.add_argument("--top", type=int, default=25, help="ops listed")
  p.add_argument("--reps", type=int, default=3, help="profiled steps")
  cfg, args = cli.parse_args(p)
  if args.top < 0 or args.reps < 1:
    raise cli.UsageError("--top must be >= 0 and --reps >= 1")

  from ar_lm_jax import perf
  perf.apply_gpu_xla_flags()
  rows, step_s = perf.profile_step(cfg, reps=args.reps)
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
