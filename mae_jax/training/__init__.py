"""Training: optimisation, sharding, checkpoints and the train loops."""
