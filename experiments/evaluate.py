"""Evaluate: `python -m experiments.evaluate --workdir=DIR|--checkpoint=DIR [--step=N] --data=FILE.jsonl
[--lang=LANG] [--max_docs=N] [--batch_size=N]`.

Scores every document of FILE.jsonl ({"text", "lang"} per line; .gz and .zst too), or, with
--lang, of any source training reads (Parquet, plain text, JSONL), with a training
checkpoint and prints one JSON line per language, then one with "lang": "all":
docs, tokens (predictions scored), bytes (UTF-8 bytes of the predicted text),
text_bytes, loss, perplexity, bits_per_byte. How documents are scored:
ar_lm_jax/evaluate.py. Exit codes: 0 ok, 2 bad input (one line on stderr).
"""

import json

from ar_lm_jax import cli


def main() -> int:
  p = cli.make_parser(__doc__, with_config=False)
  p.add_argument("--workdir", default=None, help="a run directory (its checkpoints/ are read)")
  p.add_argument("--checkpoint", default=None, help="a checkpoints directory, or one step's directory in it")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
  p.add_argument("--data", required=True, help="JSONL (.gz, .zst) with \"text\" and \"lang\" fields; with --lang, "
                 "any format training reads (JSONL, Parquet, text; a file, glob or directory)")
  p.add_argument("--lang", default=None, help="score every document of --data as this language")
  p.add_argument("--max_docs", type=int, default=None, help="score at most N documents per language")
  p.add_argument("--batch_size", type=int, default=None, help="rows of seq_len per batch (default: the run's micro-batch)")
  _, args = cli.parse_args(p)

  from ar_lm_jax import startup
  startup.start(multiprocess=False)  # the GPU flags, before jax starts a backend
  from ar_lm_jax import evaluate  # jax is imported only after the flags parsed
  lines = evaluate.evaluate_file(args.data, workdir=args.workdir, checkpoint=args.checkpoint, step=args.step,
                                 max_docs=args.max_docs, batch_size=args.batch_size, lang=args.lang)
  for line in lines:
    print(json.dumps(line, ensure_ascii=False))
  return 0


if __name__ == "__main__":
  cli.run_main(main)
