"""Named configs: each module's `get_config()` returns a `Config`; `--config=NAME` imports `ar_lm_jax.configs.NAME`.

Package data rather than files beside the repo, so a name resolves wherever the package is installed.
A config of your own needs no entry here: pass its path, `--config=path/to/mine.py`.
"""
