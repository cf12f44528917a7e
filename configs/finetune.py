"""Points to the packaged config, mae_jax/configs/finetune.py, for scripts that open
`configs/finetune.py` themselves in a checkout (`--config=configs/finetune.py:VARIANT` finds the
packaged file from any directory)."""
from mae_jax.configs.finetune import VARIANTS, get_config  # pylint: disable=unused-import
