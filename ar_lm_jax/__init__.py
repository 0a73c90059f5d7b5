"""ar_lm_jax: JAX/Flax training stack for Arabic Stable LM 2 1.6B."""
