"""`ar_stablelm_2_1_6b`: the Arabic Stable LM 2 1.6B stage (continued pre-training of Stable LM 2 1.6B).

Where each figure comes from:

- The model card (stabilityai/ar-stablelm-2-base): 500k steps of 96 x 4096 tokens
  (global batch 393,216 tokens; 2 nodes x 8 H100, micro-batch 6 per GPU); 300k steps
  "with a cosine and inverse square-root schedule", then 200k of linear ("early")
  cooldown; bf16; the pool of 619B English and ~115B Arabic tokens (84% / 16%: pool
  sizes, not how often each is sampled).
- The paper (Alyafeai et al. 2024, arXiv 2412.04277), through a public literature review
  that quotes its PDF (secondary; the PDF itself was not available to us): 10k warmup
  steps, max lr 5e-4, min lr 2.5e-6; sampling shares 18% English / 82% Arabic.
- The base model's public pre-training config (stablelm-2-1_6b.yml): AdamW b1 0.9,
  b2 0.95, eps 1e-8, weight decay 0.1, clipping 1.0, min lr 1e-4.
- Ours: the min lr read as the cooldown's end; the cosine's hand-over at step 100k to
  sqrt(peak x 1e-4) and the inverse-sqrt floor of 1e-4 at 300k (`optim.ar_stablelm2_phases`
  says why; `optim.ar_stablelm2_guess_phases` is our earlier guess, 3e-4 peak and 5k
  warmup); init_lr 0 (the released weights carry no Adam moments); no decay on biases
  and norms; remat, the chunked loss and 16 virtual shards of the data order.

Plot the schedule: python -m tools.plot_schedule --config=ar_stablelm_2_1_6b --print_steps=0,10000,300000,500000

Set `checkpoint.init_from` to the Hugging Face Stable LM 2 1.6B directory and
`data.sources` to the real English/Arabic corpora, weighted 0.18 / 0.82 (the sampling
shares), for an actual run; the default sources are the bundled sample, weighted alike.

Mesh: data=16 x model=1 over 2 nodes x 8 GPUs, i.e. the card's arithmetic
(16 GPUs x micro-batch 6 = 96, no accumulation; the public StableLM 2 config also
has model-parallel size 1). A 1.6B model fits one GPU with ZeRO-1 (fp32 params
6.6 GB + grads 6.6 GB + 1/16 of the AdamW moments 0.8 GB), so tensor parallelism
would only add all-reduces inside every layer. `--config.mesh.data=8
--config.mesh.model=2` also works on 16 GPUs: 12 sequences per data replica.
The data order is drawn from 16 virtual shards, so the run resumes exactly on 1, 2,
4, 8 or 16 processes (one per node or one per GPU).
Check a launch on a laptop first (docs/multihost.md):
  XLA_FLAGS=--xla_force_host_platform_device_count=16 python -m experiments.train --config=ar_stablelm_2_1_6b --dry_run
"""

from ar_lm_jax import optim
from ar_lm_jax.config import (SAMPLE_DIR, CheckpointConfig, Config, DataConfig, MeshConfig, ModelConfig, OptimConfig,
                              SourceConfig, TrainConfig)


def get_config() -> Config:
  return Config(
      name="ar_stablelm_2_1_6b",
      # bf16 compute, fp32 params (the card's bf16 training). Remat keeps only each block's attention
      # and MLP outputs: the dry run's CPU estimate is ~42 GB of temporaries per device with it (even
      # with the XLA reference attention) against ~880 GB without, for an 80 GB H100. Attention `auto`:
      # cuDNN flash attention with per-document lengths on GPU, splash on TPU, the reference on CPU.
      model=ModelConfig(dtype="bfloat16", remat="save_attn_mlp_out", attention="auto"),
      # Global batch 96 x 4096 = 393,216 tokens per step; the paper's sampling shares; 16 virtual shards
      # (any process count dividing 16 can resume the run).
      data=DataConfig(seq_len=4096, batch_size=96, virtual_shards=16,
                      sources=(SourceConfig(str(SAMPLE_DIR / "en_train.jsonl"), "en", 0.18, format="jsonl"),
                               SourceConfig(str(SAMPLE_DIR / "ar_train.jsonl"), "ar", 0.82, format="jsonl"))),
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
