"""Train: `python -m experiments.train [--config=NAME] [--workdir=DIR] [--config.section.key=VALUE ...]`.

With no arguments it trains `tiny` on the bundled bilingual sample.
"""

import json
import sys
import time

from ar_lm_jax import cli
from ar_lm_jax.config import override


def main() -> int:
  p = cli.make_parser(__doc__)
  p.add_argument("--workdir", default=None, help="run directory (default: runs/CONFIG-TIMESTAMP); an existing one resumes")
  p.add_argument("--dry_run", action="store_true", help="build abstractly, print mesh, sizes and memory, allocate nothing")
  p.add_argument("--target", default=None, help="with --dry_run: compile for this Cloud TPU slice (v5p-16, v5litepod-16, ...; "
                 "needs libtpu, see docs/tpu.md); exit 1 if it does not fit")
  p.add_argument("--init_from_hf", default=None, help="start a fresh run from a Hugging Face StableLm directory")
  p.add_argument("--coordinator_address", default=None, help="host:port of process 0 (multi-host)")
  p.add_argument("--num_processes", type=int, default=None, help="number of processes (multi-host)")
  p.add_argument("--process_id", type=int, default=None, help="this process's index (multi-host)")
  cfg, args = cli.parse_args(p)
  if args.init_from_hf:  # shorthand for --config.checkpoint.init_from, so the run's config.json records it
    cfg = override(cfg, "checkpoint.init_from", args.init_from_hf)

  if args.target:
    cfg = _resolve_epochs(cfg, None, multi=False, is_main=True)
    return dry_run_for_target(cfg, args.target, args.dry_run)
  from ar_lm_jax import startup  # the GPU flags, then joining the processes, before any backend starts
  multi = startup.start(args.coordinator_address, args.num_processes, args.process_id,
                        peer_timeout_s=cfg.checkpoint.peer_timeout_s)
  from ar_lm_jax import distributed, loop
  import jax
  from ar_lm_jax.errors import UserError
  is_main = jax.process_index() == 0  # only process 0 prints (and logs, and writes metrics)
  workdir = args.workdir or f"runs/{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
  cfg = _resolve_epochs(cfg, None if args.dry_run else workdir, multi=multi, is_main=is_main)
  if args.dry_run:
    from ar_lm_jax import dry_run
    report = dry_run.dry_run(cfg)
    if is_main:
      print(json.dumps(report))
    distributed.finish()
    return 0
  try:
    launch = distributed.check_launch(cfg)  # how many processes and devices joined, against the mesh
    if is_main:
      print(launch, flush=True)
    with cli.train_workdir(workdir, is_main):  # new, empty or one of our runs; a failed start leaves nothing
      summary = loop.run(cfg, workdir)
  except loop.NonFiniteError as e:  # a failed run, not bad input: exit 1, one line
    if multi:
      distributed.exit_after_error(e, 1, f"error: {e}")
    print(f"error: {e}", file=sys.stderr)
    return 1
  except UserError as e:
    if multi:  # the others must not wait for this process in a collective, nor it for them at exit
      distributed.exit_after_error(e, cli.EXIT_BAD_INPUT, f"error: {e}")
    raise
  except Exception as e:  # noqa: BLE001 - in a multi-process run, perhaps a peer that died
    if multi:
      distributed.exit_after_error(e, 1)
    raise
  distributed.finish()
  if is_main:
    print(f"metrics: {summary['metrics']}\ncheckpoints: {summary['checkpoints']}")
    print(json.dumps(summary))
  return 0


def _resolve_epochs(cfg, workdir, *, multi: bool, is_main: bool):
  """train.epochs -> train.steps, counted from the data (or as recorded in the workdir of a resumed run); printed."""
  from ar_lm_jax import epochs
  from ar_lm_jax.config import ConfigError
  try:
    cfg, plan = epochs.resolve(cfg, workdir)
  except ConfigError as e:
    if multi:  # every process counts the same data, but none may wait for the others in a collective
      from ar_lm_jax import distributed
      distributed.exit_after_error(e, cli.EXIT_BAD_INPUT, f"error: {e}")
    raise
  if plan is not None and is_main:
    print(plan.describe(cfg), flush=True)
  return cfg


def dry_run_for_target(cfg, target: str, dry_run_flag: bool) -> int:
  """--dry_run --target: one process compiles for the whole slice, here; it joins no job and opens no local accelerator."""
  from ar_lm_jax import tpu_topology
  if not dry_run_flag:
    raise cli.UsageError("--target needs --dry_run")
  tpu = tpu_topology.lookup(target)
  if not tpu_topology.libtpu_installed():
    raise cli.UsageError(tpu_topology.INSTALL_HINT)
  tpu_topology.prepare_environment(tpu)  # before jax starts
  from ar_lm_jax import dry_run
  report = dry_run.dry_run(cfg, target=target)
  print(json.dumps(report), flush=True)
  if not report["fits"]:
    print(dry_run.verdict_line(report), file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  cli.run_main(main)
