"""Points to the packaged config, mae_jax/configs/pretrain.py, for scripts that open
`configs/pretrain.py` themselves in a checkout (`--config=configs/pretrain.py:VARIANT` finds the
packaged file from any directory)."""
from mae_jax.configs.pretrain import VARIANTS, get_config  # pylint: disable=unused-import
