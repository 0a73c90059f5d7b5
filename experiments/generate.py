"""Generate: `python -m experiments.generate --checkpoint=DIR|--workdir=DIR [--step=N] --prompt="..."
[--max_new_tokens=N] [--greedy | --temperature=T --top_k=K --top_p=P --seed=S]`.

Continues the prompt with a training checkpoint (KV-cached decoding, stops at EOS
or after N tokens), prints the continuation, then a last line that is a JSON
object {"tokens": the generated ids (EOS not included), "text": their decoding}. Exit codes: 0 ok,
2 bad input (one line on stderr).

--chat: the prompt is a user message (or a JSON list of {"role", "content"} messages); it is
rendered with the run's chat template and generation prompt, decoding stops at <|im_end|>, and the
assistant's reply is printed.
"""

import json

from ar_lm_jax import cli


def main() -> int:
  p = cli.make_parser(__doc__, with_config=False)
  p.add_argument("--workdir", default=None, help="a run directory (its checkpoints/ are read)")
  p.add_argument("--checkpoint", default=None, help="a checkpoints directory, or one step's directory in it")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
  p.add_argument("--prompt", required=True, help="text to continue (no BOS is added)")
  p.add_argument("--max_new_tokens", type=int, default=64, help="stop after N tokens if no EOS came first")
  p.add_argument("--greedy", action="store_true", help="argmax decoding (ignores the sampling flags)")
  p.add_argument("--temperature", type=float, default=1.0)
  p.add_argument("--top_k", type=int, default=0, help="sample among the K most likely tokens (0: all)")
  p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass (1: all)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--chat", action="store_true", help="reply to --prompt as a chat model (the run's chat template)")
  _, args = cli.parse_args(p)

  if not args.prompt:  # checked before the checkpoint is read: the flags alone are wrong
    raise cli.UsageError("--prompt is empty: give text to continue (no BOS is added)")
  if args.max_new_tokens < 1:
    raise cli.UsageError(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
  from ar_lm_jax import startup
  startup.start(multiprocess=False)  # the GPU flags, before jax starts a backend
  from ar_lm_jax import generate, saved_run  # jax is imported only after the flags parsed
  sampling = (generate.GREEDY if args.greedy else generate.Sampling(args.temperature, args.top_k, args.top_p)).check()
  run = saved_run.load_run(args.workdir, args.checkpoint, args.step)
  cfg = run.setup.cfg
  if args.chat:
    [out] = generate.generate_chat(run.params, cfg.model, [_messages(args.prompt)], args.max_new_tokens, sampling,
                                   args.seed, cfg.data.tokenizer_path, cfg.data.chat_template)
  else:
    [out] = generate.generate_text(run.params, cfg.model, [args.prompt], args.max_new_tokens, sampling, args.seed,
                                   cfg.data.tokenizer_path)
  print(out["text"])
  print(json.dumps({"tokens": out["tokens"], "text": out["text"]}, ensure_ascii=False))
  return 0


def _messages(prompt: str) -> list:
  """--chat's prompt: a JSON list of messages, or a user message."""
  try:
    messages = json.loads(prompt)
  except ValueError:
    messages = None
  return messages if isinstance(messages, list) else [{"role": "user", "content": prompt}]


if __name__ == "__main__":
  cli.run_main(main)
