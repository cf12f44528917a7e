"""User commands: convert official checkpoints, export an encoder, prepare data, show
reconstructions, plan a TPU slice, rehearse a run on gs:// (`python -m mae_jax.tools.<name>
--help`)."""
