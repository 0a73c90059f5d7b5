"""`tiny`: every StableLM 2 feature and the real 100352-row vocab, sized for a 2-core CPU.

The default of `python -m experiments.train`: trains on the bundled bilingual
sample in a couple of minutes.
"""

from ar_lm_jax.config import (CheckpointConfig, Config, DataConfig, ModelConfig, OptimConfig, PhaseConfig,
                              TrainConfig)


def get_config() -> Config:
  return Config(
      name="tiny",
      model=ModelConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=176,
                        max_position_embeddings=512, attention="auto"),  # the reference on CPU, a flash kernel on GPU/TPU
      data=DataConfig(seq_len=128, batch_size=8, prefetch=2),
      optim=OptimConfig(
          init_lr=0.0,
          # In steps, not fractions of train.steps: a shorter run (--config.train.steps=10) follows the
          # same curve, so it can be resumed to 200 with the same losses as one uninterrupted run.
          phases=(PhaseConfig("linear_warmup", steps=10, end_lr=3e-3),
                  PhaseConfig("cosine", steps=190, end_lr=3e-4)),
      ),
      # Chunked cross-entropy: half the step time of unchunked autodiff on CPU (benchmarks/RESULTS.md).
      train=TrainConfig(steps=200, log_every=10, eval_every=100, loss_chunk_size=16),
      checkpoint=CheckpointConfig(every_steps=100, keep=2),
  )
