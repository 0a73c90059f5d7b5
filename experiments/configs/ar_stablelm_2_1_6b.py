"""`ar_stablelm_2_1_6b`: the Arabic Stable LM 2 1.6B stage (ar-stablelm-2-base card).

Continued pre-training of Stable LM 2 1.6B for 500k steps of 96 x 4096 tokens:
300k steps of warmup + cosine + inverse-sqrt, then a 200k-step linear cooldown
to 0 (`optim.ar_stablelm2_phases`, whose docstring gives the unpublished choices,
among them the 3e-4 peak lr). AdamW b1 0.9, b2 0.95, eps 1e-8, weight decay 0.1
(not on biases and norms), clipping 1.0: the base model's published values.
Plot the schedule: python -m tools.plot_schedule --config=ar_stablelm_2_1_6b --out=lr.png

Set `checkpoint.init_from` to the Hugging Face Stable LM 2 1.6B directory and
`data.sources` to the real English/Arabic corpora for an actual run (the default
sources are the bundled sample).

Mesh: data=16 x model=1 over 2 nodes x 8 GPUs, i.e. the card's arithmetic
(16 GPUs x micro-batch 6 = 96, no accumulation; the public StableLM 2 config also
has model-parallel size 1). A 1.6B model fits one GPU with ZeRO-1 (fp32 params
6.6 GB + grads 6.6 GB + 1/16 of the AdamW moments 0.8 GB), so tensor parallelism
would only add all-reduces inside every layer. `--config.mesh.data=8
--config.mesh.model=2` also works on 16 GPUs: 12 sequences per data replica.
Check a launch on a laptop first (docs/multihost.md):
  XLA_FLAGS=--xla_force_host_platform_device_count=16 python -m experiments.train --config=ar_stablelm_2_1_6b --dry_run
"""

from ar_lm_jax import optim
from ar_lm_jax.config import CheckpointConfig, Config, DataConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig


def get_config() -> Config:
  return Config(
      name="ar_stablelm_2_1_6b",
      # bf16 compute, fp32 params (the card's bf16 training). Remat keeps only each block's attention
      # and MLP outputs: the dry run's CPU estimate is ~42 GB of temporaries per device with it (even
      # with the XLA reference attention) against ~880 GB without, for an 80 GB H100. Attention `auto`:
      # cuDNN flash attention with per-document lengths on GPU, splash on TPU, the reference on CPU.
      model=ModelConfig(dtype="bfloat16", remat="save_attn_mlp_out", attention="auto"),
      data=DataConfig(seq_len=4096, batch_size=96),  # global batch 96 x 4096 = 393,216 tokens per step
      mesh=MeshConfig(data=16, model=1, shard_optimizer_over_data=True),  # 16 GPUs, ZeRO-1 (see above)
      optim=OptimConfig(
          init_lr=0.0,
          phases=optim.ar_stablelm2_phases(),
          b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, decay_embeddings=True, clip_norm=1.0,
          grad_accum_steps=1,  # the card's run: 16 GPUs x micro-batch 6 = 96 sequences, no accumulation
      ),
      # Chunked LM head + cross-entropy: the full fp32 logits of a micro-batch (6 x 4096 x 100352) would be 9.9 GB.
      train=TrainConfig(steps=500_000, loss_chunk_size=1024),
      checkpoint=CheckpointConfig(every_steps=2000),
  )
