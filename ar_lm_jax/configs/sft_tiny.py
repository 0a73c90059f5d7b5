"""`sft_tiny`: supervised fine-tuning of the `tiny` model on the bundled conversations (CPU, about a minute).

The fine-tuning counterpart of `tiny`: the same model, so `--config.checkpoint.init_from=<a tiny
workdir>` starts from a base run, trained on `ar_lm_jax/sample_data/chat_train.jsonl` (45 short English and
Arabic conversations written for this project; `chat_valid.jsonl` is the held-out split scored
every 10 steps) with the loss on the assistant turns only (`data.loss_on`), and 10% of the rows
replaying the pre-training text (loss on every token), as fine-tuning recipes do to keep the base
model's language modelling. See docs/finetuning.md.

Epochs: the conversations render to about 2.9k tokens, 75% of a 8 x 256 batch once replay is
added, so a step is about one epoch over the conversations (`data/epochs_0_chat` in the metrics
counts them); the 30 steps are ~30 epochs, the overfitting regime a tiny model on 45 conversations
is for (a real SFT run is 2-3 epochs, see ar_stablelm_2_1_6b_sft).
"""

from ar_lm_jax.config import (SAMPLE_DIR, CheckpointConfig, DataConfig, OptimConfig, PhaseConfig, SourceConfig,
                              TrainConfig, load_config)


def get_config():
  base = load_config("tiny")  # the same model, so a tiny run's weights load
  chat = lambda name, weight: SourceConfig(path=str(SAMPLE_DIR / name), lang="chat", weight=weight, format="chat")
  text = lambda name, lang, weight: SourceConfig(path=str(SAMPLE_DIR / name), lang=lang, weight=weight, format="jsonl")
  return base.replace(
      name="sft_tiny",
      data=DataConfig(
          sources=(chat("chat_train.jsonl", 0.9), text("en_train.jsonl", "en", 0.05), text("ar_train.jsonl", "ar", 0.05)),
          eval_sources=(chat("chat_valid.jsonl", 1.0),),
          # Rows of 256 hold the longest bundled conversation (~120 tokens) whole; tiny has 512 positions.
          seq_len=256, batch_size=8, prefetch=2, loss_on="assistant"),
      # Fine-tuning lrs are a few times below pre-training's: a short warmup, then linear decay to 0.
      optim=OptimConfig(init_lr=0.0, weight_decay=0.0,
                        phases=(PhaseConfig("linear_warmup", steps=3, end_lr=1e-3),
                                PhaseConfig("linear_decay", steps=27, end_lr=0.0))),
      train=TrainConfig(steps=30, log_every=5, eval_every=10, loss_chunk_size=64),
      checkpoint=CheckpointConfig(every_steps=10, keep=2),
  )
