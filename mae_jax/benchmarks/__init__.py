"""Measurements: step and input throughput, the encoder/decoder asymmetry, and the PyTorch
reference (transformers' ViTMAE run in its own interpreter, `torch_worker`)."""
