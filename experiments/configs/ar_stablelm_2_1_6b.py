"""`ar_stablelm_2_1_6b`: the Arabic Stable LM 2 1.6B stage (ar-stablelm-2-base card).

Continued pre-training of Stable LM 2 1.6B for 500k steps of 96 x 4096 tokens:
300k steps of warmup + cosine + inverse-sqrt, then a 200k-step linear cooldown
to 0 (`optim.ar_stablelm2_phases`, whose docstring gives the unpublished choices,
among them the 3e-4 peak lr). AdamW b1 0.9, b2 0.95, eps 1e-8, weight decay 0.1
(not on biases and norms), clipping 1.0: the base model's published values.
Plot the schedule: python -m tools.plot_schedule --config=ar_stablelm_2_1_6b --out=lr.png

Sections other than optim/train/checkpoint are left at their defaults here: set
`checkpoint.init_from` to the Hugging Face Stable LM 2 1.6B directory and
`data.sources` to the real English/Arabic corpora for an actual run.
"""

from ar_lm_jax import optim
from ar_lm_jax.config import CheckpointConfig, Config, ModelConfig, OptimConfig, TrainConfig


def get_config() -> Config:
  return Config(
      name="ar_stablelm_2_1_6b",
      model=ModelConfig(dtype="bfloat16"),  # bf16 compute, fp32 params (the card's bf16 training)
      optim=OptimConfig(
          init_lr=0.0,
          phases=optim.ar_stablelm2_phases(),
          b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, decay_embeddings=True, clip_norm=1.0,
          grad_accum_steps=1,  # the card's run: 16 GPUs x micro-batch 6 = 96 sequences, no accumulation
      ),
      train=TrainConfig(steps=500_000),
      checkpoint=CheckpointConfig(every_steps=2000),
  )
