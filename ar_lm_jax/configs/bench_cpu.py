"""`bench-cpu`: the CPU performance preset of `python -m experiments.benchmark`.

A 4-layer StableLM 2 at width 256 with the real 100352-row vocab, so the LM head
and the cross-entropy over the vocab dominate the step, as they do for small
models. fp32, AdamW with gradient clipping; compared against transformers'
StableLmForCausalLM + torch.optim.AdamW by `--compare_torch`.
"""

from ar_lm_jax.config import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig


def get_config() -> Config:
  return Config(
      name="bench-cpu",
      model=ModelConfig(hidden_size=256, num_layers=4, num_heads=8, intermediate_size=704,
                        vocab_size=100352, max_position_embeddings=256, dtype="float32", param_dtype="float32"),
      data=DataConfig(seq_len=256, batch_size=8, prefetch=2),
      optim=OptimConfig(clip_norm=1.0),
      # 16 positions x 8 rows = 128 tokens per LM-head chunk: the fastest on 2 cores (fewer, larger chunks
      # spill the fp32 logits out of cache; smaller ones re-read the 100 MB head more often).
      train=TrainConfig(steps=100, log_every=10, progress=False, loss_chunk_size=16),
  )
