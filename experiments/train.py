"""Train: `python -m experiments.train [--config=NAME] [--workdir=DIR] [--config.section.key=VALUE ...]`.

With no arguments it trains `tiny` on the bundled bilingual sample.
"""

import json
import time

from ar_lm_jax import cli


def main() -> int:
  p = cli.make_parser(__doc__)
  p.add_argument("--workdir", default=None, help="run directory (default: runs/CONFIG-TIMESTAMP); an existing one resumes")
  p.add_argument("--dry_run", action="store_true", help="build abstractly, print mesh, sizes and memory, allocate nothing")
  p.add_argument("--init_from_hf", default=None, help="start a fresh run from a Hugging Face StableLm directory")
  p.add_argument("--coordinator_address", default=None, help="host:port of process 0 (multi-host)")
  p.add_argument("--num_processes", type=int, default=None, help="number of processes (multi-host)")
  p.add_argument("--process_id", type=int, default=None, help="this process's index (multi-host)")
  cfg, args = cli.parse_args(p)

  from ar_lm_jax import distributed, trainer  # jax is imported only after the flags parsed
  distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
  workdir = args.workdir or f"runs/{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
  summary = trainer.run(cfg, workdir)
  print(f"metrics: {summary['metrics']}\ncheckpoints: {summary['checkpoints']}")
  print(json.dumps(summary))
  return 0


if __name__ == "__main__":
  cli.run_main(main)
