"""Points to mae_jax/configs for scripts that import `configs` from a checkout."""
