"""User commands: convert official checkpoints, export an encoder, prepare data, show
reconstructions, plan a TPU slice (`python -m mae_jax.tools.<name> --help`)."""
