"""`sft_tiny`: supervised fine-tuning of the `tiny` model on the bundled conversations (CPU, about a minute).

The fine-tuning counterpart of `tiny`: the same model, so `--config.checkpoint.init_from=<a tiny
workdir>` starts from a base run, trained on `ar_lm_jax/sample_data/chat_train.jsonl` (45 short English and
Arabic conversations written for this project; `chat_valid.jsonl` is the held-out split scored
every 10 steps) with the loss on the assistant turns only (`data.loss_on`), and 10% of the rows
replaying the pre-training text (loss on every token), as fine-tuning recipes do to keep the base
model's language modelling. See docs/finetuning.md.

Epochs: `train.epochs=30` (the run's length; `train.steps` is counted from the data at start-up,
see ar_lm_jax.epochs). The conversations render to 1,774 tokens, 6.9 rows of 256, and take 90% of
the 8 rows of a batch, so a step is about one epoch: 30 epochs are ceil(30 x 1774 / (256 x 8 x 0.9))
= 29 steps, the overfitting regime a tiny model on 45 conversations is for (a real SFT run is 2-3
epochs, see ar_stablelm_2_1_6b_sft). `data/epochs_0_chat` in the metrics counts the passes read.
`--config.train.steps=N` instead gives an N-step run (the command line's length replaces the other).
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
      # Fine-tuning lrs are a few times below pre-training's: a short warmup, then linear decay to 0
      # (fractions, since the steps are counted from the data).
      optim=OptimConfig(init_lr=0.0, weight_decay=0.0,
                        phases=(PhaseConfig("linear_warmup", fraction=0.1, end_lr=1e-3),
                                PhaseConfig("linear_decay", fraction=0.9, end_lr=0.0))),
      train=TrainConfig(steps=0, epochs=30.0, log_every=5, eval_every=10, loss_chunk_size=64),
      checkpoint=CheckpointConfig(every_steps=10, keep=2),
  )
