"""The collective report: bytes per collective read from HLO text, and the train step's communication budget.

A hand-written module checks the parser against bytes counted by hand (loops,
async pairs, tuples, sub-computations). The compiled train step of a scaled-down
recipe (bf16, remat, chunked loss, ZeRO-1) on 8 fake CPU devices must reduce its
gradients once: all-reduce + reduce-scatter at most 1.05 x the fp32 gradient
bytes, and nothing communicated inside the chunked-loss loop.
"""

import dataclasses
import textwrap
from pathlib import Path

import jax
import pytest

from ar_lm_jax import collectives, loss
from ar_lm_jax import step as step_lib
from ar_lm_jax.config import MeshConfig, load_config
from ar_lm_jax.model import param_count

REPO_ROOT = Path(__file__).resolve().parents[1]  # the checkout
HLO = textwrap.dedent("""\
    HloModule m, entry_computation_layout={(f32[256,4]{1,0}, bf16[8,16]{1,0})->f32[256,4]{1,0}}

    %add (a: f32[], b: f32[]) -> f32[] {
      %a = f32[] parameter(0)
      %b = f32[] parameter(1)
      ROOT %s = f32[] add(%a, %b)
    }

    %body (p: (s32[], f32[256,4])) -> (s32[], f32[256,4]) {
      %p = (s32[], f32[256,4]{1,0}) parameter(0)
      %i = s32[] get-tuple-element(%p), index=0
      %x = f32[256,4]{1,0} get-tuple-element(%p), index=1
      %ar = f32[256,4]{1,0} all-reduce(%x), channel_id=1, replica_groups={{0,1}}, to_apply=%add, metadata={op_name="jit(f)/while/body/psum"}
      ROOT %t = (s32[], f32[256,4]{1,0}) tuple(%i, %ar)
    }

    %cond (p.1: (s32[], f32[256,4])) -> pred[] {
      %p.1 = (s32[], f32[256,4]{1,0}) parameter(0)
      %i.1 = s32[] get-tuple-element(%p.1), index=0
      %n = s32[] constant(7)
      ROOT %lt = pred[] compare(%i.1, %n), direction=LT
    }

    %rs_comp (q: f32[256,4]) -> f32[128,4] {
      %q = f32[256,4]{1,0} parameter(0)
      ROOT %rs.2 = f32[128,4]{1,0} reduce-scatter(%q), channel_id=4, dimensions={0}, to_apply=%add
    }

    ENTRY %main (x.1: f32[256,4], y: bf16[8,16]) -> f32[256,4] {
      %x.1 = f32[256,4]{1,0} parameter(0)
      %y = bf16[8,16]{1,0} parameter(1)
      %ags = (bf16[8,16]{1,0}, bf16[16,16]{1,0}) all-gather-start(%y), channel_id=2, dimensions={0}
      %agd = bf16[16,16]{1,0} all-gather-done(%ags)
      %c0 = s32[] constant(0)
      %tup = (s32[], f32[256,4]{1,0}) tuple(%c0, %x.1)
      %w = (s32[], f32[256,4]{1,0}) while(%tup), condition=%cond, body=%body, metadata={op_name="jit(f)/chunked_loss/while"}
      %w.2 = (s32[], f32[256,4]{1,0}) while(%tup), condition=%cond, body=%body, metadata={op_name="jit(f)/layers/while"}, backend_config={"known_trip_count":{"n":"3"}}
      %as = ((f32[256,4]{1,0}), f32[128,4]{1,0}) async-start(%x.1), calls=%rs_comp
      %ad = f32[128,4]{1,0} async-done(%as), calls=%rs_comp
      %rss = ((f32[256,4]{1,0}), f32[128,4]{1,0}) reduce-scatter-start(%x.1), calls=%rs_comp, dimensions={0}
      %rsd = f32[128,4]{1,0} reduce-scatter-done(%rss)
      %cp = (f32[256,4]{1,0}, s32[]) collective-permute(%x.1, %c0), channel_id=3, source_target_pairs={{0,1},{1,0}}
      ROOT %out = f32[256,4]{1,0} get-tuple-element(%w), index=1
    }
    """)


def test_report_of_a_hand_written_module():
  r = collectives.collective_report(HLO)
  f32_buf = 256 * 4 * 4
  # The all-reduce runs 7 times in the first loop (bound read from its condition) and 3 in the second
  # (known_trip_count); the async all-gather counts its operand once (bf16 8x16), the async reduce-scatter
  # once through its wrapped computation, and once as a `-start` naming that computation; the permute counts
  # its two operands.
  assert r.bytes_per_device == {"all-reduce": 10 * f32_buf, "reduce-scatter": 2 * f32_buf, "all-gather": 8 * 16 * 2,
                                "all-to-all": 0, "collective-permute": f32_buf + 4}
  assert sorted((c.loops, c.trips) for c in r.in_loops) == [(("jit(f)/chunked_loss/while",), 7),
                                                            (("jit(f)/layers/while",), 3)]
  assert [c.name for c in r.inside("chunked_loss")] == ["ar"]
  assert r.inside("chunked_loss")[0].op_name == "jit(f)/while/body/psum"
  gather = next(c for c in r.collectives if c.kind == "all-gather")
  assert gather.result_bytes == 8 * 16 * 2 + 16 * 16 * 2  # the -start's tuple of operand and result
  assert r.unknown_trip_counts == ()
  assert collectives.shape_bytes("(pred[3], s4[3], /*index=2*/f64[2,2]{1,0}, token[])") == 3 + 2 + 32


@pytest.fixture(scope="module")
def step_reports():
  base = load_config("tiny")
  out = {}
  for name, chunk, z_loss in (("fused", 16, 0.0), ("recompute", 16, 1e-4), ("unchunked", 0, 0.0)):
    cfg = base.replace(model=dataclasses.replace(base.model, vocab_size=2048, dtype="bfloat16", remat="save_attn_mlp_out"),
                       data=dataclasses.replace(base.data, seq_len=64, batch_size=16),
                       optim=dataclasses.replace(base.optim, z_loss=z_loss),
                       train=dataclasses.replace(base.train, loss_chunk_size=chunk),
                       mesh=MeshConfig(data=8, model=1, shard_optimizer_over_data=True))
    setup = step_lib.build(cfg, jax.devices()[:8])
    with setup.activate():
      compiled = step_lib.jit_train_step(setup).lower(setup.abstract_state, step_lib.abstract_batch(cfg)).compile()
    r = collectives.collective_report(compiled)
    out[name] = {"bytes": r.bytes_per_device, "in_chunk_loop": [c.op_name for c in r.inside(loss.LOOP_SCOPE)],
                 "grad_bytes": 4 * param_count(setup.abstract_state.params), "unknown": list(r.unknown_trip_counts)}
  return out


@pytest.mark.parametrize("path", ["fused", "recompute", "unchunked"])
def test_train_step_reduces_gradients_once(step_reports, path):
  """Chunked loss without z-loss (fused), with it (recompute), and unchunked."""
  r = step_reports[path]
  reduction = r["bytes"]["all-reduce"] + r["bytes"]["reduce-scatter"]
  assert reduction <= 1.05 * r["grad_bytes"], f"{reduction} bytes reduced for {r['grad_bytes']} bytes of fp32 gradients"
  assert r["in_chunk_loop"] == [], "collectives inside the chunked-loss loop"
  assert r["unknown"] == []
