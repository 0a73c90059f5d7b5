"""lm-evaluation-harness backend `ar_lm_jax`: lm-eval's tasks answered by our checkpoints on our mesh.

Importing this module registers the backend with lm-eval (`@register_model("ar_lm_jax")`);
`experiments/harness.py` is its command line, `loop.py` calls `TrainHarness` on the live
parameters. Only this module and its entry point import lm-eval: training never needs it.

What each request type computes, and why it equals lm-eval's `hf` backend
(`lm_eval/models/huggingface.py`) on the exported Hugging Face model:

- Tokens: `tok_encode` is Arcade100k with special-token strings recognised
  (`allow_special=True`), which is what the exported HF tokenizer does; no BOS.
  The context/continuation split is TemplateLM's own (`_encode_pair`: trailing
  spaces of the context move to the continuation, the pair is encoded whole and
  split after the context's tokens; an empty context becomes the EOT token).
- loglikelihood: the sequence is (context + continuation)[-(max_length + 1):];
  its first n tokens are the input, the last len(continuation) positions are
  scored. log p sums fp32 log-softmax values; is_greedy is "argmax over every
  vocabulary row equals the continuation token at every scored position", as HF.
- loglikelihood_rolling: lm-eval's `get_rolling_token_windows` +
  `make_disjoint_window` with windows of `max_length` and EOT as prefix, each
  window scored as a loglikelihood request, the sums added per document.
- generate_until: `generate.generate` (KV cache, greedy unless the task asks for
  sampling), the prompt left-truncated to max_length - max_gen_toks, the output
  decoded without special tokens and cut at the first stop string (the task's
  `until` plus the EOT text), as HF's postprocessing does. generate.py never
  emits the embedding's padding rows or the unused id 100256, which HF could;
  a trained model gives them no mass.

`max_length` defaults to `model.max_position_embeddings`, the number lm-eval's HF
backend reads from the exported config.json.

Scoring is packed (as `evaluate.py` packs documents): request sequences go into
rows of one bucket length (powers of two up to max_length) first-fit decreasing,
each with its own segment id and positions from 0, so a packed request scores
exactly as alone. Only the scored positions (a continuation's few tokens, not
the context) go through the LM head and the log-softmax over the 100352-row
vocabulary. The rows of a batch are sharded over the mesh's `data` axis, the
params stay in the run's shardings, and every bucket shape (row length, scored
positions per row: powers of two) has one ahead-of-time compiled function.
Identical sequences are scored once.

Multi-host: lm-eval's request order is not deterministic across hosts, so only
process 0 runs lm-eval. Every batch it scores (or generates) is first broadcast
from process 0 (`multihost_utils.broadcast_one_to_all`: a fixed-size header,
then the arrays), and the other processes run `Engine.follow`, which receives
those batches and runs the same compiled functions until process 0 sends STOP
(always sent, in a `finally`, also when process 0 fails: the others then raise
instead of waiting forever).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from ar_lm_jax import aot
from ar_lm_jax import batch as batch_lib
from ar_lm_jax import generate as generate_lib
from ar_lm_jax import saved_run, sharding
from ar_lm_jax import step as step_lib
from ar_lm_jax.config import ConfigError
from ar_lm_jax.model import StableLM, lm_head_kernel, lm_logits
from ar_lm_jax.tokenizer import FIRST_SPECIAL_ID, load_tokenizer

ROW_KEYS = batch_lib.INPUT_KEYS  # [rows, T]: the packed inputs (no loss mask: the scored positions say what counts)
SCORE_KEYS = batch_lib.SCORE_KEYS  # [rows, S]: the positions scored in each row and their next tokens
MIN_BUCKET = 64  # shortest row length compiled; shorter requests share rows of this length
MIN_SCORED = 8  # fewest scored positions per row compiled
SCORE_CHUNK = 512  # scored positions of LM head + log-softmax at once: [rows, S, V] fp32 logits never exist whole
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's HF default when a task sets no max_gen_toks
OP_STOP, OP_SCORE, OP_GENERATE, OP_FAILED = 0, 1, 2, 3
HEADER = 8  # int32 slots of the header process 0 broadcasts before every batch


class HarnessError(ConfigError):
  """Bad input, reported in one line with exit code 2 (a ConfigError): unusable harness input: an unknown task, a dataset missing from the offline cache, bad backend arguments."""


# ---------------------------------------------------------------------------
# Device side: per-token scores of packed rows, and generation, on every process.


def token_scores(hidden_BTD: jax.Array, head_DV: jax.Array, index_BS: jax.Array, targets_BS: jax.Array, dtype: str,
                 chunk: int):
  """(log p(target) [B, S] fp32, target == argmax of the logits [B, S]) at positions `index_BS` of each row.

  Only the scored positions go through the LM head (a multiple-choice continuation is a few
  tokens after a long context), `chunk` of them at a time.
  """
  hidden_BSD = jnp.take_along_axis(hidden_BTD, index_BS[..., None], axis=1)
  B, T = targets_BS.shape
  C = math.gcd(T, chunk)

  def one(xs):
    h_BCD, t_BC = xs
    logits_BCV = lm_logits(h_BCD, head_DV, dtype)
    lse_BC = jax.nn.logsumexp(logits_BCV, axis=-1)
    target_BC = jnp.take_along_axis(logits_BCV, t_BC[..., None], axis=-1)[..., 0]
    return target_BC - lse_BC, jnp.argmax(logits_BCV, axis=-1) == t_BC

  split = lambda x: jnp.moveaxis(x.reshape(B, T // C, C, *x.shape[2:]), 1, 0)
  logp_nBC, greedy_nBC = jax.lax.map(one, (split(hidden_BSD), split(targets_BS)))
  unsplit = lambda x: jnp.moveaxis(x, 0, 1).reshape(B, T)
  return unsplit(logp_nBC), unsplit(greedy_nBC)


class Engine:
  """The run's model in its shardings: `score` packed rows, `generate` continuations; multi-host aware.

  `rows` is the batch (rows per call), a multiple of the mesh's data axis. `dtype` is the
  compute dtype (float32 by default, the precision lm-eval's HF reference runs in).
  """

  def __init__(self, setup: step_lib.Setup, rows: int, dtype: str = "float32"):
    data_axis = setup.mesh.shape[sharding.DATA]
    if rows < 1:
      raise HarnessError(f"batch_size must be >= 1, got {rows}")
    self.setup = setup
    self.rows = -(-rows // data_axis) * data_axis
    self.model_cfg = dataclasses.replace(setup.cfg.model, dtype=dtype, remat="none")
    self.model = StableLM(self.model_cfg)
    self._batch_sharding = sharding.batch_sharding(setup.mesh)
    self._compiled: dict[int, Any] = {}
    self.multi = jax.process_count() > 1
    self.is_main = jax.process_index() == 0

  def _score_fn(self, params, batch):
    hidden_BTD = self.model.apply({"params": params}, batch["tokens"], batch["segment_ids"], batch["positions"],
                                  return_hidden=True)
    return token_scores(hidden_BTD, lm_head_kernel(params), batch["score_index"], batch["score_targets"],
                        self.model_cfg.dtype, SCORE_CHUNK)

  def compiled(self, length: int, scored: int):
    """The scoring function of rows of `length` tokens with `scored` positions each, compiled ahead of time on first use."""
    key = (length, scored)
    if key not in self._compiled:
      replicated = NamedSharding(self.setup.mesh, P())
      fn = jax.jit(self._score_fn, in_shardings=(self.setup.state_shardings.params,
                                                 {k: self._batch_sharding for k in ROW_KEYS + SCORE_KEYS}),
                   out_shardings=(replicated, replicated))
      abstract = {**batch_lib.abstract(self.rows, length, ROW_KEYS), **batch_lib.abstract(self.rows, scored, SCORE_KEYS)}
      with self.setup.activate():
        self._compiled[key] = aot.compile_fn(fn, self.setup.abstract_state.params, abstract)
    return self._compiled[key]

  # Process 0 announces every batch; the others receive it in `follow`.
  def _header(self, *values: int) -> np.ndarray:
    h = np.zeros(HEADER, np.int32)
    h[:len(values)] = values
    return self._bcast(h)

  def _bcast(self, x: np.ndarray) -> np.ndarray:
    if not self.multi:
      return x
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.broadcast_one_to_all(x, is_source=self.is_main))

  def _run_score(self, params, inputs_KRT: np.ndarray, scored_KRS: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    place = lambda x: jax.make_array_from_callback(x.shape, self._batch_sharding, lambda idx: x[idx])
    batch = {**{k: place(inputs_KRT[i]) for i, k in enumerate(ROW_KEYS)},
             **{k: place(scored_KRS[i]) for i, k in enumerate(SCORE_KEYS)}}
    logp_RS, greedy_RS = self.compiled(inputs_KRT.shape[-1], scored_KRS.shape[-1])(params, batch)
    return np.asarray(logp_RS), np.asarray(greedy_RS)  # replicated: every process holds them whole

  def score(self, params, rows: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """log p(target) and greedy flags [rows, S] at each row's scored positions (process 0 in a multi-host run)."""
    inputs_KRT = np.stack([rows[k] for k in ROW_KEYS]).astype(np.int32)
    scored_KRS = np.stack([rows[k] for k in SCORE_KEYS]).astype(np.int32)
    if self.multi:
      self._header(OP_SCORE, inputs_KRT.shape[-1], scored_KRS.shape[-1])
      inputs_KRT, scored_KRS = self._bcast(inputs_KRT), self._bcast(scored_KRS)
    return self._run_score(params, inputs_KRT, scored_KRS)

  def _run_generate(self, params, prompts_BP: np.ndarray, lengths_B: np.ndarray, max_new: int,
                    sampling: generate_lib.Sampling, seed: int) -> list[list[int]]:
    prompts = [row[:n].tolist() for row, n in zip(prompts_BP, lengths_B)]
    # Outside setup.activate(): without the logical-axis rules the batch is not constrained onto `data`, so the
    # ids come out replicated and every process can read them (generate() reads them with np.asarray).
    return generate_lib.generate(params, self.model_cfg, prompts, max_new, sampling, jax.random.key(seed))

  def generate(self, params, prompts: Sequence[Sequence[int]], max_new: int, sampling: generate_lib.Sampling,
               seed: int) -> list[list[int]]:
    """Continuations of up to `rows` prompts (ids, EOS not included); the batch is padded to `rows` so shapes repeat."""
    n = len(prompts)
    prompts = list(prompts) + [prompts[0]] * (self.rows - n)
    lengths_B = np.array([len(p) for p in prompts], np.int32)
    width = int(-(-lengths_B.max() // generate_lib.PROMPT_BUCKET) * generate_lib.PROMPT_BUCKET)
    prompts_BP = np.zeros((len(prompts), width), np.int32)
    for b, p in enumerate(prompts):
      prompts_BP[b, :len(p)] = p
    if self.multi:
      floats = np.array([sampling.temperature, sampling.top_p], np.float32)
      self._header(OP_GENERATE, width, max_new, sampling.top_k, seed)
      floats, prompts_BP, lengths_B = self._bcast(floats), self._bcast(prompts_BP), self._bcast(lengths_B)
    return self._run_generate(params, prompts_BP, lengths_B, max_new, sampling, seed)[:n]

  def stop(self, failed: bool = False) -> None:
    """Releases the processes waiting in `follow` (process 0; a no-op in a single-process run)."""
    if self.multi and self.is_main:
      self._header(OP_FAILED if failed else OP_STOP)

  @contextlib.contextmanager
  def leading(self) -> Iterator[None]:
    """Process 0's side of a multi-host evaluation: the followers are always released at the end."""
    failed = True
    try:
      yield
      failed = False
    finally:
      self.stop(failed)

  def follow(self, params) -> None:
    """The other processes' side: run process 0's batches until it sends STOP (raises if it failed)."""
    while True:
      op, *args = self._header().tolist()
      if op == OP_STOP:
        return
      if op == OP_FAILED:
        raise HarnessError("process 0 failed during the harness evaluation (see its error)")
      if op == OP_SCORE:
        self._run_score(params, self._bcast(np.zeros((len(ROW_KEYS), self.rows, args[0]), np.int32)),
                        self._bcast(np.zeros((len(SCORE_KEYS), self.rows, args[1]), np.int32)))
      elif op == OP_GENERATE:
        width, max_new, top_k, seed = args[:4]
        temperature, top_p = self._bcast(np.zeros(2, np.float32)).tolist()
        prompts_BP = self._bcast(np.zeros((self.rows, width), np.int32))
        lengths_B = self._bcast(np.zeros(self.rows, np.int32))
        self._run_generate(params, prompts_BP, lengths_B, max_new, generate_lib.Sampling(temperature, top_k, top_p), seed)
      else:
        raise HarnessError(f"unknown harness operation {op} from process 0")


# ---------------------------------------------------------------------------
# Host side: packing requests into rows.


def buckets(max_length: int) -> list[int]:
  """Row lengths compiled: powers of two from MIN_BUCKET below max_length, then max_length."""
  out, n = [], MIN_BUCKET
  while n < max_length:
    out.append(n)
    n *= 2
  return out + [max_length]


def pack_requests(lengths: Sequence[int], rows: int, bucket_lengths: Sequence[int]) -> list[tuple[int, list[tuple[int, int, int]]]]:
  """Batches of `rows` rows: [(row length, [(request, row, start), ...])], first-fit decreasing.

  A batch's row length is the bucket of its longest request; shorter ones fill the rows' free space.
  """
  remaining = sorted(range(len(lengths)), key=lambda i: -lengths[i])
  batches = []
  while remaining:
    L = next(b for b in bucket_lengths if b >= lengths[remaining[0]])
    free = [L] * rows
    placed, rest = [], []
    for i in remaining:
      n = lengths[i]
      r = next((r for r in range(rows) if free[r] >= n), None)
      if r is None:
        rest.append(i)
        continue
      placed.append((i, r, L - free[r]))
      free[r] -= n
    batches.append((L, placed))
    remaining = rest
  return batches


def rows_of(seqs: Sequence[Sequence[int]], n_scored: Sequence[int], placed: Sequence[tuple[int, int, int]], rows: int,
            length: int) -> tuple[dict[str, np.ndarray], dict[int, tuple[int, int]]]:
  """A packed batch: inputs [rows, length], scored positions [rows, S], and each request's (row, first slot in S).

  seqs[i] is request i's input plus one more target; its last n_scored[i] input positions are scored.
  S is the most positions any row scores, rounded up to a power of two (at most `length`).
  """
  out = batch_lib.zeros(rows, length, ROW_KEYS)
  segment = np.zeros(rows, np.int32)
  used = np.zeros(rows, np.int64)
  slots: dict[int, tuple[int, int]] = {}
  index_of: list[list[np.ndarray]] = [[] for _ in range(rows)]
  target_of: list[list[np.ndarray]] = [[] for _ in range(rows)]
  for i, r, start in placed:
    seq = np.asarray(seqs[i], np.int32)
    n, c = len(seq) - 1, n_scored[i]
    segment[r] += 1
    out["tokens"][r, start:start + n] = seq[:-1]
    out["segment_ids"][r, start:start + n] = segment[r]
    out["positions"][r, start:start + n] = np.arange(n)
    slots[i] = (r, int(used[r]))
    index_of[r].append(np.arange(start + n - c, start + n))
    target_of[r].append(seq[n - c + 1:])
    used[r] += c
  S = MIN_SCORED
  while S < used.max():
    S *= 2
  S = min(S, length)
  out["score_index"] = np.zeros((rows, S), np.int32)
  out["score_targets"] = np.zeros((rows, S), np.int32)
  for r in range(rows):
    if index_of[r]:
      k = int(used[r])
      out["score_index"][r, :k] = np.concatenate(index_of[r])
      out["score_targets"][r, :k] = np.concatenate(target_of[r])
  return out, slots


# ---------------------------------------------------------------------------
# The lm-eval model.


def _int_arg(value: Any, name: str, default: Optional[int] = None) -> Optional[int]:
  if value is None or value == "" or value == "auto":
    return default
  try:
    return int(value)
  except (TypeError, ValueError):
    raise HarnessError(f"{name} must be an integer, got {value!r}") from None


@register_model("ar_lm_jax")
class ArLmJax(TemplateLM):
  """lm-eval model: `pretrained` is a run's workdir (or a converted one, or a checkpoints folder).

  lm-eval's `--model_args` map to the keyword arguments (strings are parsed). In-process
  callers pass `engine` and `params` instead (the live parameters of a training run).
  """

  def __init__(self, pretrained: Optional[str] = None, step: Any = None, batch_size: Any = None, max_length: Any = None,
               max_gen_toks: Any = None, dtype: str = "float32", seed: Any = 1234, tokenizer_path: Optional[str] = None,
               engine: Optional[Engine] = None, params: Any = None, checkpoint_step: Optional[int] = None, **_lm_eval_kwargs):
    super().__init__()
    if dtype not in ("float32", "bfloat16"):
      raise HarnessError(f"dtype must be float32 or bfloat16, got {dtype!r}")
    if engine is None:
      if pretrained is None:
        raise HarnessError("the ar_lm_jax model needs pretrained=WORKDIR (a run's workdir or a converted checkpoint)")
      run = saved_run.load_run(checkpoint=str(pretrained), step=_int_arg(step, "step"),
                               batch_rows=_int_arg(batch_size, "batch_size"))
      engine = Engine(run.setup, run.setup.cfg.data.batch_size, dtype)
      params, checkpoint_step = run.params, run.step
      tokenizer_path = tokenizer_path or run.setup.cfg.data.tokenizer_path
    self.engine, self.params = engine, params
    self.pretrained, self.checkpoint_step = pretrained, checkpoint_step
    self.tok = load_tokenizer(tokenizer_path)
    # Plain attributes: lm-eval's LM declares neither, it only reads them (as HF's backend offers them).
    self.max_length = _int_arg(max_length, "max_length", engine.model_cfg.max_position_embeddings)
    if not 1 < self.max_length <= engine.model_cfg.max_position_embeddings:
      raise HarnessError(f"max_length={self.max_length} must be in [2, model.max_position_embeddings="
                         f"{engine.model_cfg.max_position_embeddings}]")
    self.max_gen_toks = _int_arg(max_gen_toks, "max_gen_toks", DEFAULT_MAX_GEN_TOKS)
    self.seed = _int_arg(seed, "seed", 1234)
    self._buckets = buckets(self.max_length)

  # TemplateLM's tokenization hooks.
  @property
  def eot_token_id(self) -> int:
    return self.tok.eos_id

  @property
  def tokenizer_name(self) -> str:
    return "arcade100k"

  def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
    return self.tok.encode(string, allow_special=True)

  def tok_decode(self, tokens: Sequence[int]) -> str:
    """Text of generated ids without special tokens (HF's skip_special_tokens=True)."""
    return self.tok.decode([t for t in tokens if t < FIRST_SPECIAL_ID])

  def get_model_info(self) -> dict:
    return {"pretrained": None if self.pretrained is None else str(self.pretrained), "step": self.checkpoint_step,
            "model_num_parameters": int(sum(x.size for x in jax.tree.leaves(self.params))),
            "model_dtype": self.engine.model_cfg.dtype, "max_length": self.max_length}

  # Scoring.
  def score_sequences(self, seqs: Sequence[Sequence[int]], n_scored: Sequence[int]) -> list[tuple[float, bool]]:
    """(sum of log p, all greedy) of the last n_scored[i] predictions of each sequence (input + final target)."""
    unique: dict[tuple[tuple[int, ...], int], int] = {}
    index = [unique.setdefault((tuple(s), c), len(unique)) for s, c in zip(seqs, n_scored)]
    keys = list(unique)
    results: list[Optional[tuple[float, bool]]] = [None] * len(keys)
    seqs_u, scored_u = [s for s, _ in keys], [c for _, c in keys]
    for length, placed in pack_requests([len(s) - 1 for s in seqs_u], self.engine.rows, self._buckets):
      rows, slots = rows_of(seqs_u, scored_u, placed, self.engine.rows, length)
      logp_RS, greedy_RS = self.engine.score(self.params, rows)
      for i, (r, at) in slots.items():
        span = slice(at, at + scored_u[i])
        results[i] = (float(np.sum(logp_RS[r, span], dtype=np.float64)), bool(np.all(greedy_RS[r, span])))
    return [results[i] for i in index]

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
    seqs, n_scored = [], []
    for _, context_enc, continuation_enc in requests:
      if not continuation_enc or len(continuation_enc) > self.max_length:
        raise HarnessError(f"a continuation of {len(continuation_enc)} tokens cannot be scored "
                           f"(it must be 1..max_length={self.max_length} tokens, as in lm-eval's HF backend)")
      seqs.append((context_enc + continuation_enc)[-(self.max_length + 1):])
      n_scored.append(len(continuation_enc))
    out = self.score_sequences(seqs, n_scored)
    for (key, _, _), answer in zip(requests, out):
      if key is not None:
        self.cache_hook.add_partial("loglikelihood", key, answer)
    return out

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    windows, owner = [], []
    for k, (string,) in enumerate(req.args for req in requests):
      for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
          token_list=self.tok_encode(string), prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)):
        windows.append((None, context, continuation))
        owner.append(k)
    totals = [0.0] * len(requests)
    for k, (logp, _) in zip(owner, self._loglikelihood_tokens(windows)):
      totals[k] += logp
    for req, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
    return totals

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    groups: dict[str, list[int]] = {}
    for k, req in enumerate(requests):
      groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(k)
    out: list[Optional[str]] = [None] * len(requests)
    for members in groups.values():
      kwargs = normalize_gen_kwargs(requests[members[0]].args[1], self.max_gen_toks)
      until = handle_stop_sequences(kwargs.pop("until", None), eos=self.tok.eos_token)
      max_gen = int(kwargs.pop("max_gen_toks"))
      if not 0 < max_gen < self.max_length:
        raise HarnessError(f"max_gen_toks={max_gen} must be in [1, max_length={self.max_length})")
      sampling = generate_lib.Sampling(float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0,
                                       int(kwargs.get("top_k") or 0), float(kwargs.get("top_p") or 1.0))
      max_ctx = self.max_length - max_gen
      prompts = {k: (self.tok_encode(requests[k].args[0]) or [self.eot_token_id])[-max_ctx:] for k in members}
      order = sorted(members, key=lambda k: -len(prompts[k]))  # similar lengths share a batch's padding
      for at in range(0, len(order), self.engine.rows):
        chunk = order[at:at + self.engine.rows]
        ids = self.engine.generate(self.params, [prompts[k] for k in chunk], max_gen, sampling, self.seed)
        for k, x in zip(chunk, ids):
          out[k] = postprocess_generated_text(self.tok_decode(x), until, None)
          self.cache_hook.add_partial("generate_until", requests[k].args, out[k])
    return out


# ---------------------------------------------------------------------------
# Running tasks: the command line and training both come through here.


def offline() -> None:
  """No network from the datasets/hub libraries unless the user said otherwise (set before they are imported)."""
  os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
  os.environ.setdefault("HF_HUB_OFFLINE", "1")


def task_manager(include_path: Optional[str | Sequence[str]] = None):
  """lm-eval's TaskManager over its own tasks plus `include_path`; built once per process and paths
  (indexing lm-eval's thousands of task YAMLs takes seconds)."""
  offline()
  paths = [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path or [])
  for p in paths:
    if not Path(p).is_dir():
      raise HarnessError(f"--include_path: {p} is not a directory")
  return _task_manager(tuple(str(Path(p).absolute()) for p in paths))


@functools.lru_cache(maxsize=None)
def _task_manager(paths: tuple[str, ...]):
  from lm_eval.tasks import TaskManager
  return TaskManager(include_path=list(paths) or None)


def check_tasks(manager, tasks: Sequence[str]) -> None:
  """One line naming the tasks lm-eval does not know (its index plus --include_path)."""
  if not tasks:
    raise HarnessError("--tasks: give at least one task name")
  unknown = [t for t in tasks if t not in manager.all_tasks and not Path(t).is_file()]
  if unknown:
    raise HarnessError(f"unknown task(s) {', '.join(unknown)}: not in lm-eval's task index or --include_path "
                       "(`lm_eval ls tasks` lists them; docs/harness.md has the paper's tasks)")


def _missing_dataset(e: BaseException, tasks: Sequence[str]) -> Optional[str]:
  """The one-line message for a dataset that is not in the offline cache, or None when `e` is something else."""
  text = f"{type(e).__name__}: {e}"
  markers = ("OfflineModeIsEnabled", "Couldn't reach", "LocalEntryNotFound", "offline mode", "DatasetNotFound",
             "doesn't exist on the Hub", "Unable to find")
  if not any(m in text for m in markers):
    return None
  first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
  return (f"tasks {', '.join(tasks)}: a dataset is not in the local Hugging Face datasets cache ({first}); "
          "cache it on a machine with internet (docs/harness.md), or set HF_DATASETS_OFFLINE=0 HF_HUB_OFFLINE=0 "
          "to download")


def evaluate_tasks(lm: ArLmJax, tasks: Sequence[str], *, manager=None, include_path=None, num_fewshot: Optional[int] = None,
                   limit: Optional[float] = None, output_path: Optional[str] = None, log_samples: bool = False,
                   bootstrap_iters: int = 100000) -> dict:
  """lm-eval's `simple_evaluate` on process 0 (the others follow), its files written with `EvaluationTracker`.

  Every process calls this; process 0 returns lm-eval's results dict (with its "samples" when
  `log_samples`), the others {}.
  """
  if not lm.engine.is_main:
    lm.engine.follow(lm.params)
    return {}
  offline()
  import lm_eval
  from lm_eval.loggers import EvaluationTracker
  with lm.engine.leading():
    manager = manager or task_manager(include_path)
    check_tasks(manager, tasks)
    tracker = EvaluationTracker(output_path=str(output_path)) if output_path else None
    try:
      results = lm_eval.simple_evaluate(
          model=lm, model_args={"pretrained": str(lm.pretrained or "live-params")}, tasks=list(tasks),
          num_fewshot=num_fewshot, limit=limit, log_samples=log_samples, evaluation_tracker=tracker,
          task_manager=manager, bootstrap_iters=bootstrap_iters, verbosity="ERROR")
    except Exception as e:  # noqa: BLE001 - only the offline-cache case is turned into a message
      message = _missing_dataset(e, tasks)
      if message is None:
        raise
      raise HarnessError(message) from None
  if tracker is not None:
    samples = results.get("samples")
    tracker.save_results_aggregated(results={k: v for k, v in results.items() if k != "samples"},
                                    samples=samples if log_samples else None)
    if log_samples:
      for name in results["configs"]:
        tracker.save_results_samples(task_name=name, samples=samples[name])
  return results


def metric_values(results: dict) -> dict[str, dict[str, float]]:
  """{task: {lm-eval metric key ("acc,none", ...): value}}, numbers only (tasks and groups)."""
  out: dict[str, dict[str, float]] = {}
  for section in ("results", "groups"):
    for task, metrics in results.get(section, {}).items():
      values = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
      out.setdefault(task, {}).update(values)
  return out


def summary_line(results: dict, **extra) -> dict:
  """The command's last line: lm-eval's metric keys per task, then the run's identity."""
  line = {"results": metric_values(results), "n-shot": results.get("n-shot", {}), "versions": results.get("versions", {})}
  return {**line, **extra}


class TrainHarness:
  """`train.harness_tasks` every `train.harness_every` steps on the live parameters (no checkpoint round trip).

  The task index is built once; each call runs lm-eval on process 0 (the others follow) and
  returns {"harness/TASK/METRIC": value} with lm-eval's filter suffix ",none" dropped and stderrs left out.
  """

  def __init__(self, setup: step_lib.Setup):
    offline()
    cfg = setup.cfg
    self.tasks = list(cfg.train.harness_tasks)
    self.engine = Engine(setup, cfg.data.batch_size // cfg.optim.grad_accum_steps)
    self.limit = cfg.train.harness_limit or None
    # Every process checks the names, so a typo stops them all at start-up, not process 0 alone mid-run.
    self.manager = task_manager(cfg.train.harness_include_path)
    check_tasks(self.manager, self.tasks)
    self.tokenizer_path = cfg.data.tokenizer_path

  def __call__(self, params, step: int) -> dict[str, float]:
    lm = ArLmJax(engine=self.engine, params=params, checkpoint_step=step, tokenizer_path=self.tokenizer_path)
    results = evaluate_tasks(lm, self.tasks, manager=self.manager, limit=self.limit, bootstrap_iters=0)
    out = {}
    for task, metrics in metric_values(results).items():
      for key, value in metrics.items():
        name, _, filt = key.partition(",")
        if "_stderr" in name:
          continue
        out[f"harness/{task}/{name if filt in ('', 'none') else name + '_' + filt}"] = value
    return out
