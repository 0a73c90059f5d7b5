"""Pre-tokenize a corpus into ArrayRecord shards plus a manifest; rerunning resumes an interrupted run.

  python -m tools.prepare_data --input='corpus/ar/*.jsonl.zst' --output=data/ar_tok --workers=8

The output directory is then a training source:
  --config.data.sources='[{"path": "data/ar_tok", "lang": "ar", "weight": 0.2}, ...]'

Prints a progress bar, then a JSON summary (documents, tokens, skipped records) as its last line.
Exit code 2 for bad input (a path matching no files, an unknown format, a mismatched output dir, a
chat source: its shards would lose the loss mask; train on the JSONL with format "chat").
"""

from __future__ import annotations

import json
import os
import sys
from typing import Optional, Sequence

from ar_lm_jax import cli
from ar_lm_jax.config import SOURCE_FORMATS, TEXT_UNITS, SourceConfig
from ar_lm_jax.prepare_data import prepare_data


def main(argv: Optional[Sequence[str]] = None) -> int:
  p = cli.make_parser(__doc__.splitlines()[0], with_config=False)
  p.add_argument("--input", required=True, help="a file, a glob or a directory of JSONL / Parquet / text files")
  p.add_argument("--output", required=True, help="directory for the shards and manifest.json")
  p.add_argument("--format", default="auto", choices=[f for f in SOURCE_FORMATS if f != "arrayrecord"])
  p.add_argument("--text_field", default="text", help="JSONL key / Parquet column holding the text")
  p.add_argument("--text_unit", default="line", choices=TEXT_UNITS, help="plain text: a document per line or paragraph")
  p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizing processes")
  p.add_argument("--shards_per_file", type=int, default=None,
                 help="output shards per input file (default: enough to keep the workers busy; fixed on resume)")
  p.add_argument("--tokenizer_path", default=None, help="ranks file (default: the bundled cl100k ranks)")
  p.add_argument("--no_progress", action="store_true", help="no progress bar")
  _, args = cli.parse_args(p, argv)
  if args.workers < 1 or (args.shards_per_file is not None and args.shards_per_file < 1):
    raise cli.UsageError("--workers and --shards_per_file must be >= 1")
  source = SourceConfig(path=args.input, lang="-", format=args.format, text_field=args.text_field,
                        text_unit=args.text_unit)
  manifest = prepare_data(source, args.output, tokenizer_path=args.tokenizer_path, num_workers=args.workers,
                          shards_per_file=args.shards_per_file, progress=not args.no_progress)
  summary = {"output": args.output, "shards": len(manifest["shards"]), "documents": manifest["documents"],
             "tokens": manifest["tokens"], "skipped": manifest["skipped"]}
  print(f"wrote {summary['shards']} shards: {summary['documents']} documents, {summary['tokens']} tokens to {args.output}")
  truncated = manifest["skipped"].get("truncated_file", 0)
  if truncated:  # the shards hold the documents up to the cut; the rest of such a file is missing
    print(f"warning: the input ended early (a truncated or corrupt file) in {truncated} of the shards written: "
          "only the documents before the cut were tokenized", file=sys.stderr)
  print(json.dumps(summary))
  return 0


if __name__ == "__main__":
  cli.run_main(main)
