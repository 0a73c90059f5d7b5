"""lm-evaluation-harness on a checkpoint: `python -m experiments.harness --workdir=W --tasks=T1,T2
[--include_path=DIR] [--num_fewshot=K] [--limit=N] [--batch_size=B] [--output_path=DIR] [--log_samples]`.

Runs lm-eval's tasks through the `ar_lm_jax` backend (ar_lm_jax/harness.py) on this
host's devices, prints lm-eval's results table and ends with one JSON line
{"results": {task: {"acc,none": ...}}, ...} in lm-eval's own metric keys.
`--output_path` writes lm-eval's results file (and with `--log_samples` its per-task
samples files) in lm-eval's layout. Datasets are read from the local Hugging Face
cache only (HF_DATASETS_OFFLINE=1 unless set): a task whose data is not cached exits
2 with one line naming it. Task names and caching: docs/harness.md.
Exit codes: 0 ok, 2 bad input (one line on stderr).
"""

import json

from ar_lm_jax import cli


def _limit(text):
  try:
    value = float(text)
  except ValueError:
    raise cli.UsageError(f"--limit: expected a number of documents (or a fraction < 1), got {text!r}") from None
  if value <= 0:
    raise cli.UsageError(f"--limit must be > 0, got {text}")
  return value if value < 1 else int(value)


def main() -> int:
  p = cli.make_parser(__doc__, with_config=False)
  p.add_argument("--workdir", required=True, help="a run's workdir, a converted checkpoint (tools.convert_from_pytorch) or a checkpoints folder")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
  p.add_argument("--tasks", required=True, help="comma-separated lm-eval task or group names")
  p.add_argument("--include_path", default=None, help="a directory of extra task YAMLs")
  p.add_argument("--num_fewshot", type=int, default=None, help="few-shot examples per prompt (default: the task's)")
  p.add_argument("--limit", default=None, help="documents per task (a fraction if < 1)")
  p.add_argument("--batch_size", type=int, default=None, help="rows per batch (default: the run's micro-batch)")
  p.add_argument("--max_length", type=int, default=None, help="tokens per request (default: model.max_position_embeddings, as lm-eval's HF backend)")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
  p.add_argument("--output_path", default=None, help="directory for lm-eval's results (and samples) files")
  p.add_argument("--log_samples", action="store_true", help="also write lm-eval's per-sample files (needs --output_path)")
  p.add_argument("--coordinator_address", default=None, help="host:port of process 0 (multi-host)")
  p.add_argument("--num_processes", type=int, default=None, help="number of processes (multi-host)")
  p.add_argument("--process_id", type=int, default=None, help="this process's index (multi-host)")
  _, args = cli.parse_args(p)
  tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
  limit = None if args.limit is None else _limit(args.limit)
  if args.log_samples and not args.output_path:
    raise cli.UsageError("--log_samples needs --output_path")

  from ar_lm_jax import startup  # the GPU flags, then joining the processes, before any backend starts
  startup.start(args.coordinator_address, args.num_processes, args.process_id)
  from ar_lm_jax import harness  # jax, lm-eval and datasets are imported only after the flags parsed
  harness.offline()
  manager = harness.task_manager(args.include_path)
  harness.check_tasks(manager, tasks)  # before the checkpoint is read: a typo costs seconds, not a load
  lm = harness.ArLmJax(pretrained=args.workdir, step=args.step, batch_size=args.batch_size, max_length=args.max_length,
                       dtype=args.dtype)
  results = harness.evaluate_tasks(lm, tasks, manager=manager, num_fewshot=args.num_fewshot, limit=limit,
                                   output_path=args.output_path, log_samples=args.log_samples)
  if not lm.engine.is_main:
    return 0
  from lm_eval.utils import make_table
  print(make_table(results))
  if "groups" in results:
    print(make_table(results, "groups"))
  print(json.dumps(harness.summary_line(results, workdir=str(args.workdir), step=lm.checkpoint_step, tasks=tasks,
                                        output_path=args.output_path), ensure_ascii=False))
  return 0


if __name__ == "__main__":
  cli.run_main(main)
