"""The lr schedule, the recipe presets, the weight-decay mask, AdamW against numpy, and tools/plot_schedule."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ar_lm_jax import cli, optim
from ar_lm_jax.config import ConfigError, OptimConfig, PhaseConfig
from tools import plot_schedule

REPO_ROOT = Path(__file__).resolve().parents[1]  # the checkout

# One phase of every kind, 750 steps in a 1000-step run: the lr holds at 0 for the last 250.
ALL_KINDS = OptimConfig(init_lr=0.1, phases=(
    PhaseConfig("linear_warmup", steps=100, end_lr=1.0),
    PhaseConfig("constant", steps=50, end_lr=1.0),
    PhaseConfig("cosine", steps=200, end_lr=0.2),
    PhaseConfig("inverse_sqrt", steps=300, end_lr=0.05),
    PhaseConfig("linear_decay", steps=100, end_lr=0.0),
))


def closed_form(t: float) -> float:
  """ALL_KINDS written out by hand, in float64."""
  if t < 100:
    return 0.1 + 0.9 * t / 100
  if t < 150:
    return 1.0
  if t < 350:
    return 0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * (t - 150) / 200))
  if t < 650:
    tau = 300 / ((0.2 / 0.05) ** 2 - 1)
    return 0.2 / math.sqrt(1 + (t - 350) / tau)
  if t < 750:
    return 0.05 * (750 - t) / 100
  return 0.0


def lrs(cfg: OptimConfig, total: int, steps) -> np.ndarray:
  return np.asarray(jax.jit(optim.build_schedule(cfg, total))(jnp.asarray(steps)), np.float64)


# ---------------------------------------------------------------------------
# Schedule.


def test_values_at_boundaries_and_mid_phase_match_closed_form():
  steps = [0, 50, 99, 100, 125, 150, 250, 349, 350, 500, 649, 650, 700, 749, 750, 900, 1000, 5000]
  got = lrs(ALL_KINDS, 1000, steps)
  want = np.array([closed_form(t) for t in steps])
  np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-7)
  # The values a reader checks by eye: each phase starts where the previous ended.
  assert got[steps.index(100)] == pytest.approx(1.0)
  assert got[steps.index(350)] == pytest.approx(0.2)
  assert got[steps.index(650)] == pytest.approx(0.05)


def test_inverse_sqrt_is_a_genuine_inverse_square_root():
  # 1/lr^2 is affine in the step inside the phase: lr = a / sqrt(1 + s / tau).
  t = np.arange(350, 650)
  inv_sq = 1.0 / lrs(ALL_KINDS, 1000, t) ** 2
  slope, intercept = np.polyfit(t - 350, inv_sq, 1)
  np.testing.assert_allclose(inv_sq, intercept + slope * (t - 350), rtol=1e-5)
  assert intercept == pytest.approx(1 / 0.2 ** 2, rel=1e-5)


def test_schedule_is_continuous_on_a_fine_grid():
  lr = lrs(ALL_KINDS, 1000, np.arange(0, 1001))
  # The steepest exact per-step change is the warmup's 0.9/100; a jump at a boundary would exceed it.
  assert np.abs(np.diff(lr)).max() <= 0.009 * (1 + 1e-5)
  for (_, start, _) in optim.phase_boundaries(ALL_KINDS, 1000)[1:]:
    assert abs(lr[start] - lr[start - 1]) <= 0.009 * (1 + 1e-5)


def test_fractions_resolve_against_train_steps_and_fit():
  assert optim.phase_boundaries(OptimConfig(), 1000) == [("linear_warmup", 0, 18), ("cosine", 18, 1000)]
  # Fractions summing to 1 end exactly at train.steps, whatever the rounding.
  bounds = optim.phase_boundaries(OptimConfig(phases=optim.stablelm2_pretrain_phases()), 540_001)
  assert bounds[-1][2] == 540_001
  assert all(b[2] == c[1] for b, c in zip(bounds, bounds[1:]))
  # A phase given in steps keeps exactly its steps next to rounded fractions.
  mixed = OptimConfig(phases=(PhaseConfig("linear_warmup", fraction=0.0185, end_lr=1.0),
                              PhaseConfig("constant", steps=101, end_lr=1.0),
                              PhaseConfig("cosine", fraction=0.5, end_lr=0.1)))
  assert optim.phase_boundaries(mixed, 1000) == [("linear_warmup", 0, 19), ("constant", 19, 120), ("cosine", 120, 620)]


def test_a_run_shorter_than_its_phases_follows_the_same_curve():
  # Phases in steps do not depend on train.steps: a 700-step run is the first 700 steps of the 750-step one,
  # so a run stopped at 700 and resumed with train.steps=750 sees one schedule.
  short, full = optim.build_schedule(ALL_KINDS, 700), optim.build_schedule(ALL_KINDS, 750)
  steps = jnp.arange(0, 701)
  np.testing.assert_array_equal(np.asarray(short(steps)), np.asarray(full(steps)))


def test_fractions_past_the_run_are_a_config_error():
  too_much = OptimConfig(phases=(PhaseConfig("linear_warmup", fraction=0.6, end_lr=1.0),
                                 PhaseConfig("cosine", fraction=0.6, end_lr=0.1)))
  with pytest.raises(ConfigError, match=r"optim\.phases.*sum to 1\.2"):
    optim.build_schedule(too_much, 100)


@pytest.mark.parametrize("phases, match", [
    ((PhaseConfig("linear_warmup", steps=10, end_lr=1.0), PhaseConfig("constant", steps=10, end_lr=0.5)), "constant"),
    ((PhaseConfig("linear_decay", steps=10, end_lr=1.0),), "must not increase"),
    ((PhaseConfig("linear_warmup", steps=10, end_lr=1.0), PhaseConfig("linear_warmup", steps=10, end_lr=0.5)), "must not decrease"),
])
def test_inconsistent_phases_are_config_errors(phases, match):
  with pytest.raises(ConfigError, match=match):
    optim.build_schedule(OptimConfig(phases=phases), 100)


def test_phase_config_validation():
  with pytest.raises(ConfigError, match="exactly one of steps"):
    PhaseConfig("cosine", end_lr=0.1)
  with pytest.raises(ConfigError, match="exactly one of steps"):
    PhaseConfig("cosine", steps=10, fraction=0.5, end_lr=0.1)
  with pytest.raises(ConfigError, match="never reaches 0"):
    PhaseConfig("inverse_sqrt", steps=10, end_lr=0.0)


def test_with_cooldown_keeps_the_past_schedule():
  """Planned: cooldown at 400k. Decided at 250k: cool down from 300k instead. Nothing before 300k changes."""
  planned = OptimConfig(phases=optim.ar_stablelm2_phases(main_steps=400_000, cooldown_steps=100_000))
  edited = OptimConfig(phases=optim.with_cooldown(planned, 500_000, start=300_000, steps=200_000))
  assert optim.phase_boundaries(edited, 500_000)[-2:] == [("inverse_sqrt", 100_000, 300_000),
                                                          ("linear_decay", 300_000, 500_000)]
  t = np.arange(0, 300_001, 7)
  np.testing.assert_allclose(lrs(edited, 500_000, t), lrs(planned, 500_000, t), rtol=2e-6, atol=0)
  lr = lrs(edited, 500_000, np.arange(299_000, 500_001))
  assert np.diff(lr).max() <= 0 and lr[-1] == 0.0
  # Past the end of a shorter schedule the lr holds, then cools down.
  held = optim.with_cooldown(ALL_KINDS, 1000, start=900, steps=100)
  assert optim.phase_boundaries(OptimConfig(init_lr=0.1, phases=held), 1000)[-2:] == [("constant", 750, 900),
                                                                                      ("linear_decay", 900, 1000)]
  with pytest.raises(ConfigError, match="cosine"):
    optim.with_cooldown(planned, 500_000, start=50_000, steps=10_000)


# ---------------------------------------------------------------------------
# The Arabic recipe.


def test_ar_recipe_shape():
  """The paper's figures (via a secondary source): 10k warmup, peak 5e-4, min lr 2.5e-6 at the cooldown's end."""
  cfg = OptimConfig(phases=optim.ar_stablelm2_phases())
  assert optim.phase_boundaries(cfg, 500_000) == [
      ("linear_warmup", 0, 10_000), ("cosine", 10_000, 100_000),
      ("inverse_sqrt", 100_000, 300_000), ("linear_decay", 300_000, 500_000)]
  lr = lrs(cfg, 500_000, np.arange(0, 500_001))
  peak, min_lr = 5e-4, 2.5e-6
  # Warmup rises from ~0 to the peak, which is the maximum and is reached at the end of the warmup.
  assert lr[0] == 0.0 and 0 < lr[1] < peak * 1e-3
  assert np.all(np.diff(lr[:10_001]) >= 0)
  assert lr[10_000] == pytest.approx(peak, rel=1e-6)
  assert lr.max() == pytest.approx(peak, rel=1e-6) and int(lr.argmax()) == 10_000
  # Never increasing after the warmup.
  assert np.diff(lr[10_000:]).max() <= 0.0
  # Continuous at 300k, where the cooldown starts at the base model's min lr (our hand-over).
  assert lr[300_000] == pytest.approx(1e-4, rel=1e-6)
  assert abs(lr[300_000] - lr[299_999]) < 1e-9
  assert abs(lr[300_001] - lr[300_000]) == pytest.approx((1e-4 - min_lr) / 200_000, rel=0.05)
  # Cosine hands over at sqrt(peak * floor); the paper's min lr at the end of the run, and held after it.
  assert lr[100_000] == pytest.approx(math.sqrt(peak * 1e-4), rel=1e-6)
  assert lr[500_000] == pytest.approx(min_lr, rel=1e-6) == lr[10_000:].min()
  assert lrs(cfg, 500_000, [600_000])[0] == pytest.approx(min_lr, rel=1e-6)


def test_ar_recipe_earlier_guess_is_kept_as_a_variant():
  cfg = OptimConfig(phases=optim.ar_stablelm2_guess_phases())
  assert optim.phase_boundaries(cfg, 500_000) == [
      ("linear_warmup", 0, 5_000), ("cosine", 5_000, 100_000),
      ("inverse_sqrt", 100_000, 300_000), ("linear_decay", 300_000, 500_000)]
  lr = lrs(cfg, 500_000, np.arange(0, 500_001))
  assert lr.max() == pytest.approx(3e-4, rel=1e-6) and int(lr.argmax()) == 5_000
  assert lr[100_000] == pytest.approx(math.sqrt(3e-4 * 1e-4), rel=1e-6)
  assert lr[300_000] == pytest.approx(1e-4, rel=1e-6)
  assert lr[500_000] == 0.0
  assert lr[499_999] == pytest.approx(1e-4 / 200_000, abs=1e-11)
  with pytest.raises(ConfigError, match="min_lr"):
    optim.ar_stablelm2_phases(min_lr=2e-4)


def test_pretrain_preset_matches_public_values():
  cfg = OptimConfig(phases=optim.stablelm2_pretrain_phases())
  bounds = optim.phase_boundaries(cfg, 540_000)
  assert [b[0] for b in bounds] == ["linear_warmup", "cosine", "inverse_sqrt"]
  assert bounds[0][2] == 9_720  # 1.8% of 540k
  lr = lrs(cfg, 540_000, [9_720, 540_000])
  np.testing.assert_allclose(lr, [1e-3, 1e-4], rtol=1e-6)
  cooled = OptimConfig(phases=optim.stablelm2_pretrain_phases(cooldown_fraction=0.1))
  assert lrs(cooled, 540_000, [540_000])[0] == 0.0


# ---------------------------------------------------------------------------
# Weight-decay mask.

D, F, V, L = 4, 6, 10, 2


def block() -> dict:
  return {
      "input_layernorm": {"scale": np.ones(D), "bias": np.zeros(D)},
      "post_attention_layernorm": {"scale": np.ones(D), "bias": np.zeros(D)},
      "self_attn": {**{n: {"kernel": np.ones((D, D)), "bias": np.zeros(D)} for n in ("q_proj", "k_proj", "v_proj")},
                    "o_proj": {"kernel": np.ones((D, D))}},
      "mlp": {"gate_proj": {"kernel": np.ones((D, F))}, "up_proj": {"kernel": np.ones((D, F))},
              "down_proj": {"kernel": np.ones((F, D))}},
  }


def model_params(scanned: bool) -> dict:
  layers = ({"layers": jax.tree.map(lambda x: np.stack([x] * L), block())} if scanned
            else {f"layers_{i}": block() for i in range(L)})
  return {"params": {"embed_tokens": {"embedding": np.ones((V, D))}, **layers,
                     "norm": {"scale": np.ones(D), "bias": np.zeros(D)}, "lm_head": {"kernel": np.ones((D, V))}}}


# Written out by hand: the leaves that decay besides the embedding and the LM head.
BLOCK_DECAYED = {"self_attn/q_proj/kernel", "self_attn/k_proj/kernel", "self_attn/v_proj/kernel",
                 "self_attn/o_proj/kernel", "mlp/gate_proj/kernel", "mlp/up_proj/kernel", "mlp/down_proj/kernel"}


def decayed_paths(mask) -> set[str]:
  flat = jax.tree_util.tree_flatten_with_path(mask)[0]
  return {"/".join(str(k.key) for k in path) for path, m in flat if m}


@pytest.mark.parametrize("scanned", [True, False])
@pytest.mark.parametrize("decay_embeddings", [True, False])
def test_decay_mask_selects_exactly_the_matrices(scanned, decay_embeddings):
  params = model_params(scanned)
  mask = optim.decay_mask(params, decay_embeddings=decay_embeddings)
  assert jax.tree.structure(mask) == jax.tree.structure(params)
  assert all(isinstance(m, bool) for m in jax.tree.leaves(mask))
  prefixes = ["params/layers"] if scanned else [f"params/layers_{i}" for i in range(L)]
  want = {f"{p}/{leaf}" for p in prefixes for leaf in BLOCK_DECAYED}
  if decay_embeddings:
    want |= {"params/embed_tokens/embedding", "params/lm_head/kernel"}
  assert decayed_paths(mask) == want
  n_leaves = len(jax.tree.leaves(params))
  assert n_leaves == 4 + len(prefixes) * 14  # embedding, final norm (2), lm_head; 14 leaves per block


def test_decay_mask_on_partitioned_boxes():
  params = model_params(scanned=True)
  boxed = jax.tree.map(lambda x: nn.Partitioned(x, names=(None,) * x.ndim), params)
  mask = optim.decay_mask(boxed)
  assert nn.meta.unbox(mask) == optim.decay_mask(params)


# ---------------------------------------------------------------------------
# AdamW against a float64 numpy reference.


def reference_adamw(params, grads_seq, lrs_seq, mask, *, b1, b2, eps, wd, clip):
  """Clip by global norm, Adam with bias correction, decoupled masked decay: p -= lr * (m^ / (sqrt(v^) + eps) + wd * p)."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v = {k: np.zeros_like(x) for k, x in p.items()}
  for t, (g, lr) in enumerate(zip(grads_seq, lrs_seq), start=1):
    g = {k: np.asarray(x, np.float64) for k, x in g.items()}
    norm = math.sqrt(sum(float((x ** 2).sum()) for x in g.values()))
    if clip > 0 and norm > clip:
      g = {k: x * clip / norm for k, x in g.items()}
    for k in p:
      m[k] = b1 * m[k] + (1 - b1) * g[k]
      v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
      update = (m[k] / (1 - b1 ** t)) / (np.sqrt(v[k] / (1 - b2 ** t)) + eps)
      if mask[k]:
        update = update + wd * p[k]
      p[k] = p[k] - lr * update
  return p


@pytest.mark.parametrize("clip_norm", [1.0, 0.0])
def test_adamw_matches_numpy_reference(clip_norm):
  rng = np.random.default_rng(0)
  tree = {"embed_tokens": {"embedding": rng.normal(size=(5, 3))}, "lm_head": {"kernel": rng.normal(size=(3, 5))},
          "q_proj": {"kernel": rng.normal(size=(3, 3)), "bias": rng.normal(size=3)},
          "norm": {"scale": 1 + rng.normal(size=3)}}
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)
  # The first gradient's norm is ~4 (clipped when clip_norm=1), the second's ~0.4 (not clipped).
  grads = [jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * s, jnp.float32), tree) for s in (1.0, 0.1)]
  cfg = OptimConfig(init_lr=0.01, phases=(PhaseConfig("linear_warmup", steps=2, end_lr=0.03),),
                    b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, decay_embeddings=False, clip_norm=clip_norm)
  tx = optim.build_optimizer(cfg, total_steps=10)
  state = tx.init(params)
  p = params
  for g in grads:
    updates, state = jax.jit(tx.update)(g, state, p)
    p = optax.apply_updates(p, updates)

  flat = lambda t: {"/".join(str(k.key) for k in path): np.asarray(x) for path, x in jax.tree_util.tree_flatten_with_path(t)[0]}
  mask = flat(optim.decay_mask(tree, decay_embeddings=False))
  assert {k for k, m in mask.items() if m} == {"q_proj/kernel"}
  # Update s (counting from 1) applies schedule(s): 0.02 then 0.03 on this warmup from 0.01 to 0.03 over 2 steps.
  want = reference_adamw(flat(params), [flat(g) for g in grads], [0.02, 0.03], mask,
                         b1=0.9, b2=0.95, eps=1e-8, wd=0.1, clip=clip_norm)
  got = flat(p)
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert not np.allclose(got[k], flat(params)[k]), k  # every leaf moved


def test_optimizer_state_structure_is_stable_and_mirrors_params():
  params = jax.tree.map(jnp.asarray, model_params(scanned=True))
  states = [optim.build_optimizer(OptimConfig(clip_norm=c, weight_decay=w), 1000).init(params)
            for c, w in ((1.0, 0.1), (0.0, 0.0))]
  assert jax.tree.structure(states[0]) == jax.tree.structure(states[1])
  adam = states[0][1]
  assert jax.tree.structure(adam.mu) == jax.tree.structure(params)
  assert jax.tree.structure(adam.nu) == jax.tree.structure(params)


# ---------------------------------------------------------------------------
# tools/plot_schedule.


CONFIG_SRC = '''
from ar_lm_jax import cli, optim
from ar_lm_jax.config import Config, OptimConfig, TrainConfig

def get_config():
  return Config(name="tiny_ar", train=TrainConfig(steps=5_000),
                optim=OptimConfig(phases=optim.ar_stablelm2_phases(
                    warmup_steps=50, cosine_steps=950, main_steps=3_000, cooldown_steps=2_000)))
'''


def test_plot_schedule_writes_png_and_prints_json(tmp_path, capsys):
  config = tmp_path / "tiny_ar.py"
  config.write_text(CONFIG_SRC)
  out = tmp_path / "lr.png"
  steps = [0, 25, 50, 1000, 2999, 3000, 4000, 5000, 6000]
  assert plot_schedule.main([f"--config={config}", f"--out={out}", "--print_steps=" + ",".join(map(str, steps))]) == 0
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert list(printed) == [str(s) for s in steps]
  cfg = OptimConfig(phases=optim.ar_stablelm2_phases(warmup_steps=50, cosine_steps=950, main_steps=3_000, cooldown_steps=2_000))
  np.testing.assert_allclose([printed[str(s)] for s in steps], lrs(cfg, 5_000, steps), rtol=1e-6, atol=0)


def test_plot_schedule_applies_overrides(tmp_path, capsys):
  config = tmp_path / "tiny_ar.py"
  config.write_text(CONFIG_SRC)
  plot_schedule.main([f"--config={config}", f"--out={tmp_path / 'a.png'}", "--print_steps=10",
                      "--config.optim.init_lr=1e-4"])
  printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert printed["10"] == pytest.approx(1e-4 + (5e-4 - 1e-4) * 10 / 50, rel=1e-6)


@pytest.mark.parametrize("args", [
    ["--config=no_such_config", "--out={out}"],
    ["--config={config}", "--out={out}", "--print_steps=0,ten"],
    ["--config={config}", "--out={out}", "--print_steps=-5"],
    ["--config={config}", "--out={out}", "--config.optim.phases=[{{\"kind\": \"cosine\", \"fraction\": 1.5}}]"],
    ["--config={config}"],  # --out missing
    ["--config={config}", "--out={out}", "--bogus=1"],
])
def test_plot_schedule_bad_input_exits_2(tmp_path, capsys, args):
  config = tmp_path / "tiny_ar.py"
  config.write_text(CONFIG_SRC)
  with pytest.raises(SystemExit) as e:
    cli.run_main(lambda: plot_schedule.main([a.format(config=config, out=tmp_path / "x.png") for a in args]))
  assert e.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err and len(err.splitlines()) == 1


def test_plot_schedule_command_line(tmp_path):
  """The module runs as a command; bad input gives exit 2 and one line on stderr."""
  r = subprocess.run([sys.executable, "-m", "tools.plot_schedule", "--config=no_such_config", f"--out={tmp_path / 'x.png'}"],
                     cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
  assert r.returncode == 2, r.stderr
  assert len(r.stderr.strip().splitlines()) == 1 and "no_such_config" in r.stderr


def test_recipe_config_uses_the_ar_schedule():
  from ar_lm_jax.config import load_config
  cfg = load_config("ar_stablelm_2_1_6b")
  assert cfg.train.steps == 500_000
  assert cfg.optim.phases == optim.ar_stablelm2_phases()
  assert optim.phase_boundaries(cfg.optim, cfg.train.steps)[-1] == ("linear_decay", 300_000, 500_000)


def test_plot_schedule_prints_the_recipe_without_plotting(capsys):
  """The issue's check: the recipe's schedule shows the paper's 10k warmup and 5e-4 peak."""
  assert plot_schedule.main(["--config=ar_stablelm_2_1_6b", "--print_steps=0,10000,300000,500000"]) == 0
  printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert printed["0"] == 0.0 and printed["10000"] == pytest.approx(5e-4, rel=1e-6)
  assert printed["300000"] == pytest.approx(1e-4, rel=1e-6) and printed["500000"] == pytest.approx(2.5e-6, rel=1e-6)
