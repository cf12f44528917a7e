"""Points to the packaged config, mae_jax/configs/linprobe.py, for scripts that open
`configs/linprobe.py` themselves in a checkout (`--config=configs/linprobe.py:VARIANT` finds the
packaged file from any directory)."""
from mae_jax.configs.linprobe import VARIANTS, get_config  # pylint: disable=unused-import
