"""Import a Hugging Face StableLm model (safetensors or .bin) as an orbax checkpoint.

  python -m tools.convert_from_pytorch --hf=HF_DIR --out=CKPT_DIR [--config=NAME [--config.section.key=VALUE ...]]

CKPT_DIR becomes a workdir (config.json + checkpoints/0) whose step-0 state holds
the parameters only. Train from it with
`python -m experiments.train --config.checkpoint.init_from=CKPT_DIR` (a fresh
run: step 0, fresh optimizer state) or evaluate it like any checkpoint. The
weights go through the same mapping as `--init_from_hf`.

Without --config the run config is the defaults with the HF architecture; with
it, the HF weights must fit the config's model (a mismatch names the tensor and
both shapes). The last line is a JSON summary. Exit code 2 for bad input.
"""

from __future__ import annotations

import json
import sys
from typing import Optional, Sequence

from ar_lm_jax import cli


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  # The config is optional here: only a --config flag (or an override) makes one, else HF's config.json decides.
  with_config = any(a == "--config" or a.startswith(("--config=", "--config.")) for a in argv)
  p = cli.make_parser(__doc__.splitlines()[0], with_config=with_config)
  p.add_argument("--hf", required=True, help="Hugging Face model directory (config.json + safetensors or .bin)")
  p.add_argument("--out", required=True, help="output workdir for the checkpoint")
  p.add_argument("--overwrite", action="store_true", help="replace a previous conversion in a non-empty --out")
  cfg, args = cli.parse_args(p, argv)

  from ar_lm_jax import startup
  startup.start(multiprocess=False)  # the GPU flags, before jax starts a backend
  from ar_lm_jax import hf_io
  summary = hf_io.import_hf(args.hf, args.out, cfg=cfg, overwrite=args.overwrite)
  print(f"wrote a params-only step-0 checkpoint ({summary['num_params']:,} parameters) to {summary['checkpoints']}")
  print(json.dumps(summary))
  return 0


if __name__ == "__main__":
  cli.run_main(main)
