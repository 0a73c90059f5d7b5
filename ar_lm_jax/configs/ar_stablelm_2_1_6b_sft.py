"""`ar_stablelm_2_1_6b_sft`: supervised fine-tuning (chat / instructions) of the 1.6B base model.

Start from a base checkpoint of `ar_stablelm_2_1_6b` (`--config.checkpoint.init_from=<its workdir>`)
or from Hugging Face weights (`--init_from_hf=DIR` / `checkpoint.init_from=DIR`), and point
`data.sources` at your conversations (format "chat", JSONL of {"messages": [...]} or
{"prompt", "response"}); the bundled sample is only a placeholder. The loss is on the assistant
turns (`data.loss_on`), averaged over the scored tokens of each global batch.

The choices and where they come from:
- lr 2e-5, linear warmup over the first 3% of steps, then linear decay to 0; 2 epochs; no weight
  decay; a global batch of 128 sequences; Adam's other settings as the model was trained:
  Tulu 2 (Ivison et al. 2023, arXiv 2311.10702, full fine-tuning of Llama-2 7B-70B: lr 2e-5, 3%
  warmup, linear decay, 2 epochs, batch 128, up to 8192 tokens). Zephyr's SFT stage (Tunstall et
  al. 2023, arXiv 2310.16944) is close: lr 2e-5, 1 epoch, batch 128. Neither is a 1.6B model;
  smaller models tolerate somewhat higher rates, so 2e-5 is a conservative start to sweep
  upwards (e.g. 5e-5) on your own held-out conversations (`data.eval_sources`, format "chat").
- Rows of 4096 tokens (the model's context) so that most conversations fit a row whole;
  conversations longer than a row continue into the next (docs/finetuning.md).
- Replay of pre-training text at a small weight (here 10% of rows, the bundled sample standing in
  for the real corpora) against forgetting, which the continued pre-training itself did with
  English replay (REFERENCE.md); set the chat source's weight to 1 and drop the text ones for none.
- Epochs: `train.epochs=2` (Tulu 2's 2 epochs, above). The steps are counted from the data at
  start-up (ar_lm_jax.epochs): ceil(2 x tokens of the conversations / (0.9 x 128 x 4096)), printed
  and recorded in the run's config.json; e.g. ~70M tokens of conversations (about 100k of 700
  tokens) give 297 steps. `data/epochs_0_chat` in the metrics shows the epochs read. On the bundled
  placeholder (1,774 tokens) it is 1 step. `--config.train.steps=N` sets a fixed length instead.
- Mesh and memory as the base recipe: data=16 x model=1 (2 nodes x 8 H100), ZeRO-1, remat,
  chunked loss; 128 = 16 x 8 sequences, no accumulation.
"""

from ar_lm_jax.config import (SAMPLE_DIR, CheckpointConfig, DataConfig, OptimConfig, PhaseConfig, SourceConfig,
                              TrainConfig, load_config)


def get_config():
  base = load_config("ar_stablelm_2_1_6b")
  return base.replace(
      name="ar_stablelm_2_1_6b_sft",
      data=DataConfig(
          sources=(SourceConfig(str(SAMPLE_DIR / "chat_train.jsonl"), "chat", 0.9, format="chat"),
                   SourceConfig(str(SAMPLE_DIR / "en_train.jsonl"), "en", 0.05, format="jsonl"),
                   SourceConfig(str(SAMPLE_DIR / "ar_train.jsonl"), "ar", 0.05, format="jsonl")),
          eval_sources=(SourceConfig(str(SAMPLE_DIR / "chat_valid.jsonl"), "chat", 1.0, format="chat"),),
          seq_len=4096, batch_size=128, loss_on="assistant"),
      optim=OptimConfig(
          init_lr=0.0,
          phases=(PhaseConfig("linear_warmup", fraction=0.03, end_lr=2e-5),  # of the steps the epochs give
                  PhaseConfig("linear_decay", fraction=0.97, end_lr=0.0)),
          b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0, clip_norm=1.0, grad_accum_steps=1),
      train=TrainConfig(steps=0, epochs=2.0, log_every=10, eval_every=50, loss_chunk_size=1024),
      checkpoint=CheckpointConfig(every_steps=100, keep=2),
  )
