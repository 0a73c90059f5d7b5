"""The PyTorch baseline of `experiments.benchmark --compare_torch`: transformers' StableLmForCausalLM + torch AdamW.

Same model config, batch and thread count as our train step, so the two can be
timed alternately in one process. torch and transformers are imported inside the
functions: the benchmark without --compare_torch never needs them installed.

What the baseline does per step: forward with `labels` (HF's fp32 cross-entropy
over the full [B, T, V] logits), backward, `clip_grad_norm_`, `AdamW.step`,
`zero_grad(set_to_none=True)`. Attention is plain causal SDPA without the
per-document mask: the same FLOPs as ours, on torch's fastest CPU attention path.
"""

from __future__ import annotations

import time

import numpy as np

from ar_lm_jax.config import Config
from ar_lm_jax.hf import hf_config_dict

ADAMW_IMPLS = ("default", "foreach", "fused")  # torch's own choice on CPU (a per-tensor loop), or a forced variant


class TorchBaseline:
  """One transformers StableLmForCausalLM and its AdamW, stepped on a fixed batch (arguments checked by train_step.check_args)."""

  def __init__(self, cfg: Config, batch: dict, threads: int, adamw: str = "default", seed: int = 0):
    import torch
    import transformers

    self._torch = torch
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    hf_cfg = transformers.StableLmConfig(**{k: v for k, v in hf_config_dict(cfg.model).items()
                                            if k not in ("architectures", "model_type", "torch_dtype")})
    hf_cfg._attn_implementation = "sdpa"
    self.model = transformers.StableLmForCausalLM(hf_cfg).train()
    o = cfg.optim
    kwargs = {"foreach": True} if adamw == "foreach" else {"fused": True} if adamw == "fused" else {}
    self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, betas=(o.b1, o.b2), eps=o.eps,
                                 weight_decay=o.weight_decay, **kwargs)
    self.clip_norm = o.clip_norm
    self.input_ids = torch.from_numpy(np.asarray(batch["tokens"], np.int64))
    self.position_ids = torch.from_numpy(np.asarray(batch["positions"], np.int64))
    self.labels = torch.from_numpy(hf_labels(batch["tokens"], batch["segment_ids"]))

  def step(self) -> float:
    """One train step; returns the loss (reading it waits for nothing: CPU torch is synchronous)."""
    out = self.model(input_ids=self.input_ids, position_ids=self.position_ids, labels=self.labels)
    out.loss.backward()
    if self.clip_norm > 0:
      self._torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_norm)
    self.opt.step()
    self.opt.zero_grad(set_to_none=True)
    return float(out.loss.detach())

  def timed_step(self) -> float:
    t = time.perf_counter()
    self.step()
    return time.perf_counter() - t


def hf_labels(tokens_BT: np.ndarray, segment_ids_BT: np.ndarray) -> np.ndarray:
  """HF labels (shifted inside the model) scoring exactly the positions our loss scores: -100 elsewhere."""
  tokens_BT, seg = np.asarray(tokens_BT), np.asarray(segment_ids_BT)
  labels = np.full(tokens_BT.shape, -100, np.int64)
  # Position t predicts t+1 iff both are in the same non-padding segment (loss.targets_and_mask).
  scored_next = (seg[:, :-1] != 0) & (seg[:, 1:] == seg[:, :-1])
  labels[:, 1:] = np.where(scored_next, tokens_BT[:, 1:], -100)
  return labels
