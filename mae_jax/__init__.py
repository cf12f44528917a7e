"""mae_jax: Masked Autoencoder pre-training of Vision Transformers in JAX/Flax."""
