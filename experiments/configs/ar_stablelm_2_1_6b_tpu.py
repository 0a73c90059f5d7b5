"""`ar_stablelm_2_1_6b_tpu`: the card's run (`ar_stablelm_2_1_6b`) on a Cloud TPU v5p-16 slice.

Everything of the recipe stays (model, data, 500k-step schedule, AdamW, checkpoints); only
the mesh changes: v5p-16 is 8 chips on 2 hosts, so `mesh.data=8 x model=1` holds the
card's global batch of 96 x 4096 as 12 sequences per chip, with no accumulation and no
FSDP (ZeRO-1 splits the AdamW moments 8 ways). Attention `auto` is the splash kernel on TPU.

Why v5p-16. It is the smallest slice that takes the card's batch without gradient
accumulation. The dry run (libtpu 0.0.42, `--dry_run --target=...`, docs/tpu.md):
DRY_RUN_NUMBERS
v5p-8 (4 chips) would need 24 sequences per chip, twice the temporaries; 16 v5e chips do
not fit even with FSDP (docs/tpu.md); v6e-16 is the alternative with most compute.

  python -m experiments.train --config=ar_stablelm_2_1_6b_tpu --dry_run --target=v5p-16
"""

from pathlib import Path

from ar_lm_jax.config import MeshConfig, load_config


def get_config():
  base = load_config(str(Path(__file__).with_name("ar_stablelm_2_1_6b.py")), Path(__file__).parent)
  return base.replace(
      name="ar_stablelm_2_1_6b_tpu",
      mesh=MeshConfig(data=8, model=1, shard_optimizer_over_data=True, fsdp=False),  # v5p-16: 8 chips, 12 sequences each
  )
