"""Benchmark the train step: `python -m experiments.benchmark --config=NAME [--steps=N] [--compare_torch] [--config.section.key=VALUE]`.

Compiles the step ahead of time (printing memory_analysis()), times N steps on a
synthetic packed batch after warm-up, and prints tokens/s and MFU. The last line
is a JSON object; its `collective_bytes_per_device` gives the bytes each device
sends to each kind of collective per step, read from the compiled HLO. `--compare_torch` alternates with transformers'
StableLmForCausalLM + torch.optim.AdamW on the same config, batch and threads. The benchmark itself is
benchmarks/train_step.py, outside the package; run this from the repo root.
"""

import json

from ar_lm_jax import cli


def main() -> int:
  p = cli.make_parser(__doc__, default_config="bench-cpu")
  p.add_argument("--steps", type=int, default=5, help="timed steps (after warm-up)")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
  p.add_argument("--compare_torch", action="store_true", help="also time the transformers + torch.optim.AdamW baseline")
  p.add_argument("--torch_adamw", default="default",
                 help="torch AdamW implementation: default (torch's own choice on this device), foreach or fused")
  cfg, args = cli.parse_args(p)  # the values are checked once, by benchmarks.train_step.check_args

  from ar_lm_jax import startup
  startup.start(multiprocess=False)  # the GPU flags, before jax starts a backend
  from benchmarks import train_step
  result = train_step.benchmark(cfg, steps=args.steps, warmup=args.warmup, compare_torch=args.compare_torch,
                                torch_adamw=args.torch_adamw)
  print(json.dumps(result))
  return 0


if __name__ == "__main__":
  cli.run_main(main)
