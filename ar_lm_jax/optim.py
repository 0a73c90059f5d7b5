"""The optimizer of the recipe: a multi-phase learning-rate schedule and masked AdamW.

A schedule is a list of phases (`optim.phases`: linear_warmup, constant, cosine, inverse_sqrt,
linear_decay), each running from the lr the previous one ended at to its own end_lr, so phases
always join. The lr is a pure function of the step: nothing of it lives in the checkpoint, and a run
may edit its phases and resume (`with_cooldown`). AdamW decays matrices only (`decay_mask`). The
presets are the recipes' phase lists, used by `ar_lm_jax/configs`.

docs/optim.md has each phase's formula, how ours relates to gpt-neox's `hybrid_cosine_inv_sqrt`,
and for every figure of the presets whether it is published (and where) or our choice.

This module imports only `ar_lm_jax.config`, jax, numpy and optax.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ar_lm_jax.config import ConfigError, OptimConfig, PhaseConfig

# Modules whose matrices follow `optim.decay_embeddings` rather than the default.
EMBEDDING_MODULES = ("embed_tokens", "lm_head")
# Leaf names that are weight matrices (decayed); every other leaf (bias, scale, ...) is not.
MATRIX_LEAVES = ("kernel", "embedding")


# ---------------------------------------------------------------------------
# Schedule.


@dataclasses.dataclass(frozen=True)
class _Segment:
  """One phase resolved to steps [start, end) and the lr at both ends."""
  kind: str
  start: int
  end: int
  start_lr: float
  end_lr: float


def _resolve(cfg: OptimConfig, total_steps: int) -> list[_Segment]:
  """Turns the phases into step ranges and checks that they fit and make sense."""
  if total_steps < 0:
    raise ConfigError(f"train.steps: must be >= 0, got {total_steps}")
  exact = [float(p.steps) if p.steps > 0 else p.fraction * total_steps for p in cfg.phases]
  # Phases given in steps may outlast the run: a run with fewer train.steps follows the same curve
  # and stops early, so `--config.train.steps=10` then `=20` in one workdir equals one 20-step run.
  # Fractions of the run cannot sum past the run (a small tolerance absorbs float error).
  frac_total = sum(p.fraction for p in cfg.phases if p.steps == 0)
  if frac_total > 1 + 1e-6:
    raise ConfigError(f"optim.phases: the fractions of train.steps sum to {frac_total:g}, more than 1")
  # Step lengths are exact. Fractional lengths are rounded at their running sum, not one by
  # one, so that fractions summing to 1 fill train.steps exactly.
  lengths, frac_sum, frac_rounded = [], 0.0, 0
  for phase, e in zip(cfg.phases, exact):
    if phase.steps > 0:
      lengths.append(phase.steps)
    else:
      frac_sum += e
      lengths.append(int(math.floor(frac_sum + 0.5)) - frac_rounded)
      frac_rounded += lengths[-1]
  ends = np.cumsum(lengths)
  segments, start, lr = [], 0, float(cfg.init_lr)
  for i, (phase, end) in enumerate(zip(cfg.phases, ends)):
    key = f"optim.phases[{i}]"
    a, b = lr, float(phase.end_lr)
    if phase.kind == "linear_warmup" and b < a:
      raise ConfigError(f"{key}: a linear_warmup phase must not decrease (from {a:g} to {b:g}); use linear_decay")
    if phase.kind in ("linear_decay", "inverse_sqrt") and b > a:
      raise ConfigError(f"{key}: a {phase.kind} phase must not increase (from {a:g} to {b:g})")
    if phase.kind == "constant" and not math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0):
      raise ConfigError(f"{key}: a constant phase holds the lr it starts at ({a:g}); set its end_lr to {a:g}, not {b:g}")
    segments.append(_Segment(phase.kind, start, int(end), a, b))
    start, lr = int(end), b
  return segments


def _phase_lr(seg: _Segment, t, xp=jnp):
  """The lr of one phase at (float) steps t, with t clipped into the phase; xp is jnp or np (float64 checks)."""
  a, b = seg.start_lr, seg.end_lr
  u = xp.clip((t - seg.start) / (seg.end - seg.start), 0.0, 1.0)  # progress through the phase
  if seg.kind in ("linear_warmup", "linear_decay"):
    return a + (b - a) * u
  if seg.kind == "constant":
    return xp.full_like(u, a)
  if seg.kind == "cosine":
    return b + (a - b) * 0.5 * (1.0 + xp.cos(xp.pi * u))
  if seg.kind == "inverse_sqrt":
    # a / sqrt(1 + s / tau) with s = u * L and tau = L / ((a/b)^2 - 1); a == b is a constant.
    return a / xp.sqrt(1.0 + u * ((a / b) ** 2 - 1.0))
  raise AssertionError(seg.kind)  # PhaseConfig has already validated the kind


def build_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
  """The lr as a jit-able function of the update step (int or int array), in float32.

  `total_steps` is train.steps: fractions resolve against it (they may not sum past
  1: ConfigError naming optim.phases). Phases given in steps may outlast the run,
  which then stops partway along the same curve; a shorter schedule holds its last
  end_lr until the end.
  """
  segments = _resolve(cfg, total_steps)
  final_lr = segments[-1].end_lr

  def schedule(step):
    t = jnp.maximum(jnp.asarray(step, jnp.float32), 0.0)
    lr = jnp.full(t.shape, final_lr, jnp.float32)
    # Later phases first, so that each earlier phase overrides the steps before its end.
    for seg in reversed(segments):
      if seg.end > seg.start:  # a phase rounded to 0 steps only moves the lr it hands on
        lr = jnp.where(t < seg.end, _phase_lr(seg, t), lr)
    return lr

  return schedule


def phase_boundaries(cfg: OptimConfig, total_steps: int) -> list[tuple[str, int, int]]:
  """(kind, start step, end step) of every phase, in order, for plots and logs."""
  return [(s.kind, s.start, s.end) for s in _resolve(cfg, total_steps)]


def with_cooldown(cfg: OptimConfig, total_steps: int, *, start: int, steps: int,
                  end_lr: float = 0.0) -> tuple[PhaseConfig, ...]:
  """cfg's phases cut at step `start`, then a linear cooldown to `end_lr` over `steps`.

  For deciding on an (earlier) cooldown mid-run: the lr up to `start` is unchanged,
  so a run resumed with the new phases sees no jump. The phase that contains
  `start` is shortened and ends at the lr the old schedule had there; a cut
  linear, constant or inverse_sqrt phase is the same curve (an inverse_sqrt cut
  at s keeps its tau), a cut half-cosine would not be, so cutting inside a cosine
  phase is a ConfigError. Lengths in the result are in steps.
  """
  segments = _resolve(cfg, total_steps)
  phases = []
  for i, seg in enumerate(segments):
    if seg.start >= start or seg.end == seg.start:
      continue
    if seg.end <= start:
      phases.append(PhaseConfig(seg.kind, steps=seg.end - seg.start, end_lr=seg.end_lr))
      continue
    if seg.kind == "cosine":
      raise ConfigError(f"optim.phases[{i}]: step {start} falls inside a cosine phase ({seg.start}..{seg.end}), "
                        "which cannot be cut without changing its shape; cool down after it ends or edit it by hand")
    cut_lr = float(_phase_lr(seg, float(start), xp=np))
    phases.append(PhaseConfig(seg.kind, steps=start - seg.start, end_lr=cut_lr))
  lr_at_start = phases[-1].end_lr if phases else cfg.init_lr
  covered = sum(p.steps for p in phases)
  if covered < start:  # `start` is past the old schedule's end: hold its last lr until then
    phases.append(PhaseConfig("constant", steps=start - covered, end_lr=lr_at_start))
  if end_lr > lr_at_start:
    raise ConfigError(f"optim.phases: a cooldown to {end_lr:g} from {lr_at_start:g} would rise")
  return tuple(phases) + (PhaseConfig("linear_decay", steps=steps, end_lr=end_lr),)


# ---------------------------------------------------------------------------
# Presets: the recipes as phase lists, used by ar_lm_jax/configs (their sources: docs/optim.md).


def stablelm2_pretrain_phases(peak_lr: float = 1e-3, min_lr: float = 1e-4, *,
                              warmup_fraction: float = 0.018,
                              cosine_fraction: float = 0.25,
                              handover_lr: float | None = None,
                              cooldown_fraction: float = 0.0) -> tuple[PhaseConfig, ...]:
  """Stable LM 2 1.6B's pre-training schedule, in the shape of gpt-neox `hybrid_cosine_inv_sqrt`.

  Warmup to `peak_lr`, a cosine to `handover_lr` (default sqrt(peak * min)), an inverse-sqrt tail to
  `min_lr`, and an optional linear cooldown to 0; all lengths are fractions of train.steps. The
  public values are the defaults; which are ours: docs/optim.md.
  """
  handover = math.sqrt(peak_lr * min_lr) if handover_lr is None else handover_lr
  tail = 1.0 - warmup_fraction - cosine_fraction - cooldown_fraction
  if not (min_lr <= handover <= peak_lr and min_lr > 0):
    raise ConfigError(f"optim.phases: need 0 < min_lr <= handover_lr <= peak_lr, got {min_lr:g}, {handover:g}, {peak_lr:g}")
  if tail <= 0 or min(warmup_fraction, cosine_fraction) <= 0 or cooldown_fraction < 0:
    raise ConfigError("optim.phases: warmup and cosine fractions must be > 0 and leave room for the inverse-sqrt tail")
  phases = (
      PhaseConfig("linear_warmup", fraction=warmup_fraction, end_lr=peak_lr),
      PhaseConfig("cosine", fraction=cosine_fraction, end_lr=handover),
      PhaseConfig("inverse_sqrt", fraction=tail, end_lr=min_lr),
  )
  if cooldown_fraction > 0:
    phases += (PhaseConfig("linear_decay", fraction=cooldown_fraction, end_lr=0.0),)
  return phases


def ar_stablelm2_phases(peak_lr: float = 5e-4, floor_lr: float = 1e-4, *,
                        warmup_steps: int = 10_000,
                        cosine_steps: int = 90_000,
                        main_steps: int = 300_000,
                        cooldown_steps: int = 200_000,
                        min_lr: float = 2.5e-6) -> tuple[PhaseConfig, ...]:
  """The Arabic stage: 300k steps of warmup + cosine + inverse-sqrt, then 200k of linear cooldown to min_lr.

  A cosine from the peak to sqrt(peak * floor_lr) until `warmup_steps + cosine_steps`, an
  inverse-sqrt tail to `floor_lr` at `main_steps`, then linear to `min_lr` over `cooldown_steps`;
  the lr never rises after the warmup. Which figures the card and the paper publish and which are
  ours: docs/optim.md. `ar_stablelm2_guess_phases` is our schedule from before the paper's figures.
  """
  if not (0 < floor_lr <= peak_lr) or not 0 <= min_lr <= floor_lr:
    raise ConfigError(f"optim.phases: need 0 <= min_lr <= floor_lr <= peak_lr, floor_lr > 0, got "
                      f"{min_lr:g}, {floor_lr:g} and {peak_lr:g}")
  if min(warmup_steps, cosine_steps, cooldown_steps) <= 0 or warmup_steps + cosine_steps >= main_steps:
    raise ConfigError(f"optim.phases: need positive lengths and warmup_steps + cosine_steps < main_steps, got "
                      f"{warmup_steps} + {cosine_steps} vs {main_steps}")
  return (
      PhaseConfig("linear_warmup", steps=warmup_steps, end_lr=peak_lr),
      PhaseConfig("cosine", steps=cosine_steps, end_lr=math.sqrt(peak_lr * floor_lr)),
      PhaseConfig("inverse_sqrt", steps=main_steps - warmup_steps - cosine_steps, end_lr=floor_lr),
      PhaseConfig("linear_decay", steps=cooldown_steps, end_lr=min_lr),
  )


def ar_stablelm2_guess_phases() -> tuple[PhaseConfig, ...]:
  """Our earlier guess at the Arabic stage, before the paper's figures: peak 3e-4, 5k warmup, cooldown to 0.

  The same shape as `ar_stablelm2_phases`; kept as a variant to compare with (why 3e-4: docs/optim.md).
  """
  return ar_stablelm2_phases(peak_lr=3e-4, warmup_steps=5_000, cosine_steps=95_000, min_lr=0.0)


# ---------------------------------------------------------------------------
# Weight-decay mask and the optimizer.


def _path_names(path: tuple[Any, ...]) -> list[str]:
  """The dict keys along a pytree path; attribute keys (e.g. a Partitioned box's `value`) are skipped."""
  return [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]


def _decays(names: list[str], decay_embeddings: bool) -> bool:
  if not names or names[-1] not in MATRIX_LEAVES:
    return False  # biases (q/k/v, LayerNorm) and LayerNorm scales, and anything that is not a matrix
  if any("norm" in n for n in names[:-1]):
    return False
  if any(n in EMBEDDING_MODULES for n in names[:-1]):
    return decay_embeddings
  return True


def decay_mask(params: Any, decay_embeddings: bool = True) -> Any:
  """A pytree of bools shaped like `params`: True where weight decay applies.

  Decided by path names, so it works for scanned (`layers/...`, leading layer
  axis) and unrolled (`layers_0/...`) trees alike, with or without the top-level
  'params' key. Boxed (Partitioned) leaves give boxed bools.
  """
  return jax.tree_util.tree_map_with_path(lambda path, _: _decays(_path_names(path), decay_embeddings), params)


def scale_by_step_schedule(schedule: optax.Schedule) -> optax.GradientTransformationExtraArgs:
  """Scales updates by -schedule(step), `step` being the number of the update (from 1) the caller passes.

  The train step passes its state's step + 1. The lr is then a function of the run's
  step alone, skipped non-finite steps included: a skipped step keeps the optimizer
  state (so this transform's `count`, like Adam's, counts applied updates only), and
  an lr driven by that count would lag schedule(step) by one for every skip, so that
  a cooldown would never reach 0. Without `step` (a caller outside the train step),
  update number count + 1 is used, which is the same when nothing was skipped.
  The state keeps optax's ScaleByScheduleState(count), so checkpoints are unchanged.
  """

  def init_fn(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, *, step=None, **extra_args):
    del params, extra_args
    count = optax.safe_int32_increment(state.count)
    lr = schedule(count if step is None else step)
    updates = jax.tree.map(lambda u: (-lr * u).astype(u.dtype), updates)
    return updates, optax.ScaleByScheduleState(count=count)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def build_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformationExtraArgs:
  """Global-norm clipping, then AdamW with the phase schedule and the weight-decay mask.

  `update(grads, state, params, step=s)` applies update number s (from 1) with lr
  schedule(s), whatever the state's counters say (`scale_by_step_schedule`).
  The state is a flat 4-tuple, the same for every setting (clip_norm 0 included)
  so that a run can change them and resume:
    (clip: EmptyState, ScaleByAdamState(count, mu, nu), MaskedState(EmptyState), ScaleByScheduleState(count))
  mu and nu mirror the params (float32), e.g. to shard them over the data axis.
  """
  schedule = build_schedule(cfg, total_steps)
  return optax.chain(
      optax.clip_by_global_norm(cfg.clip_norm) if cfg.clip_norm > 0 else optax.identity(),
      optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
      # Decoupled decay, added after Adam's normalization and scaled by the lr below: p -= lr * (adam + wd * p).
      optax.add_decayed_weights(cfg.weight_decay, mask=functools.partial(decay_mask, decay_embeddings=cfg.decay_embeddings)),
      # Update number s (counting from 1, the step the loop logs and checkpoints) uses schedule(s), so
      # the lr logged and plotted for step s is the one that step applied, skipped steps included.
      scale_by_step_schedule(schedule),
  )
