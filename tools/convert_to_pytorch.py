"""Export a checkpoint as a Hugging Face model that loads with no custom code, tokenizer included.

  python -m tools.convert_to_pytorch --checkpoint=runs/tiny-X --out=hf/tiny [--step=N] [--dtype=bfloat16]

Writes config.json (StableLmForCausalLM, every architecture field explicit),
generation_config.json, sharded model-*.safetensors + index, and the Arcade100k
fast tokenizer, so that `AutoModelForCausalLM.from_pretrained(OUT)` and
`AutoTokenizer.from_pretrained(OUT)` work offline. Only the parameters are read,
never the optimizer state, and each group of tensors is checked against the
fingerprints saved with the checkpoint as it streams. Everything is written into a
temporary directory next to --out that becomes --out at the end, so a failed or
refused export leaves --out as it was. The last line is a JSON summary. Exit code 2
for bad input (no such checkpoint or step, a damaged or unreadable checkpoint, shapes
that do not match the saved config, a non-empty --out without --overwrite).
"""

from __future__ import annotations

import json
from typing import Optional, Sequence

from ar_lm_jax import cli


def main(argv: Optional[Sequence[str]] = None) -> int:
  p = cli.make_parser(__doc__.splitlines()[0], with_config=False)
  p.add_argument("--checkpoint", required=True, help="a run's workdir or its checkpoints folder")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
  p.add_argument("--out", required=True, help="output directory for the Hugging Face model")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="dtype of the exported weights")
  p.add_argument("--overwrite", action="store_true", help="replace a previous export in a non-empty --out")
  _, args = cli.parse_args(p, argv)

  from ar_lm_jax import startup
  startup.start(multiprocess=False)  # the GPU flags, before jax starts a backend
  from ar_lm_jax import hf_io
  summary = hf_io.export_checkpoint(args.checkpoint, args.out, step=args.step, dtype=args.dtype,
                                    overwrite=args.overwrite)
  print(f"wrote step {summary['step']} ({summary['num_params']:,} parameters, {summary['dtype']}) "
        f"in {summary['shards']} shard(s) with the tokenizer to {summary['out']}")
  print(json.dumps(summary))
  return 0


if __name__ == "__main__":
  cli.run_main(main)
