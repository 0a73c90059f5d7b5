"""Read N batches of a config's training pipeline and report what the model would see.

  python -m tools.inspect_data --config=tiny --batches=50 [--config.data.seq_len=256 ...]

Prints per-language token shares (realized vs configured), epochs (passes read) per source,
skipped records per reason, the padding fraction and tokens/s; the last line is a JSON object
with `token_share`, `configured_share`, `epochs`, `skipped`, `padding_fraction`,
`virtual_shards` and `tokens_per_sec`. A source whose documents recur within the first rows
gets a warning on stderr. Exit 2 for bad input.
"""

from __future__ import annotations

import json
from typing import Optional, Sequence

from ar_lm_jax import cli
from ar_lm_jax.data import inspect_pipeline


def main(argv: Optional[Sequence[str]] = None) -> int:
  p = cli.make_parser(__doc__.splitlines()[0])
  p.add_argument("--batches", type=int, default=20, help="batches to read")
  p.add_argument("--seed", type=int, default=None, help="data seed (default: the config's train.seed)")
  cfg, args = cli.parse_args(p, argv)
  if args.batches < 1:
    raise cli.UsageError("--batches must be >= 1")
  seed = cfg.train.seed if args.seed is None else args.seed
  report = inspect_pipeline(cfg.data, seed=seed, num_batches=args.batches)
  print(f"{report['batches']} batches of {cfg.data.batch_size} x {cfg.data.seq_len} tokens")
  for lang, share in report["token_share"].items():
    print(f"  {lang:>6}: {share:7.2%} of tokens (configured {report['configured_share'][lang]:7.2%}), "
          f"{report['tokens'][lang]} tokens")
  epochs = ", ".join(f"{name} {e:.2f}" for name, e in report["epochs"].items())
  print(f"  epochs read per source: {epochs} (over {report['virtual_shards']} virtual shards)")
  skipped = {r: n for r, n in report["skipped"].items() if n}
  print(f"  skipped records: {skipped or 'none'}")
  print(f"  padding: {report['padding_fraction']:.2%}   throughput: {report['tokens_per_sec']:,.0f} tokens/s")
  print(json.dumps(report))
  return 0


if __name__ == "__main__":
  cli.run_main(main)
