"""Checkpoints in and out of mae_jax: the official PyTorch release's `.pth` files and Hugging
Face's ViTMAE (`convert`), read and written without torch (`pth`) and without running pickled code
(`safe_load`), and the encoder handed to other code (`export`)."""
