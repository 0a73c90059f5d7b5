"""Shared by the tests that compare against transformers: a random StableLm (the one-thread torch is in conftest.py)."""

import torch

from ar_lm_jax import hf
from ar_lm_jax.config import ModelConfig


def random_stablelm(cfg: ModelConfig, seed: int = 0):
  """A transformers StableLmForCausalLM of `cfg` with every tensor perturbed, and its numpy state dict."""
  from transformers import StableLmConfig, StableLmForCausalLM
  fields = {k: v for k, v in hf.hf_config_dict(cfg).items() if k not in ("architectures", "model_type", "torch_dtype")}
  torch.manual_seed(seed)
  model = StableLmForCausalLM(StableLmConfig(**fields)).eval()
  with torch.no_grad():  # HF inits biases and norms to 0/1; perturb every tensor so each one matters
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.05)
  state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
  return model, state

