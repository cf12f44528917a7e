r"""Writes a pre-trained encoder (no decoder, no optimizer state) for fine-tuning and other code.

  python -m mae_jax.tools.export_encoder --workdir=workdirs/fashion_mnist --output=encoder/
  python -m mae_jax.tools.export_encoder --workdir=DIR --step=5000 --output=encoder/
  python -m mae_jax.tools.export_encoder --init=mae_pretrain_vit_base.pth \
      --model=mae_vit_base_patch16 --output=encoder/

OUT gets encoder.msgpack (mae_jax names), encoder.safetensors (official/timm names, for PyTorch)
and config.json (model name and overrides). `mae_jax.load_encoder(OUT)` returns (module, params).
"""
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # pylint: disable=g-import-not-at-top
from etils import epath  # pylint: disable=g-import-not-at-top

from mae_jax.interop import export

_WORKDIR = flags.DEFINE_string("workdir", None, "Pre-training workdir (config.json, checkpoints/).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step of --workdir; default: the newest.")
_INIT = flags.DEFINE_string("init", None, "Official MAE .pth/.safetensors, instead of --workdir.")
_MODEL = flags.DEFINE_string("model", None, "Model of --init, e.g. mae_vit_base_patch16.")
_OUTPUT = flags.DEFINE_string("output", None, "Output directory.")
_ALLOW_UNSAFE_PICKLE = flags.DEFINE_bool(
    "allow_unsafe_pickle", False,
    "Read an --init .pth that pickles arbitrary objects, which runs any code it holds: only for "
    "files you trust (without it such a file is refused).")
flags.mark_flags_as_required(["output"])
flags.mark_flags_as_mutual_exclusive(["workdir", "init"], required=True)


def main(argv):
  logging.set_verbosity(logging.WARNING)  # orbax's INFO lines would bury what the tool prints
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if _WORKDIR.value and _MODEL.value:
    raise app.UsageError("--model names the size of an --init file; a workdir's config.json "
                         "already names its model.")
  if _INIT.value and _STEP.value is not None:
    raise app.UsageError("--step picks a checkpoint of a --workdir; an --init file has one.")
  try:
    if _WORKDIR.value:
      out = export.export_encoder(_WORKDIR.value, _OUTPUT.value, _STEP.value)
    else:
      out = export.export_official(_INIT.value, _MODEL.value, _OUTPUT.value,
                                   _ALLOW_UNSAFE_PICKLE.value)
  except (FileNotFoundError, ValueError) as e:  # the message names the problem and the fix
    sys.exit(f"error: {e}")
  out = epath.Path(out)  # a local directory or gs://
  info = json.loads((out / export.CONFIG_FILE).read_text())
  print(f"Wrote the {info['model']} encoder of {info['source']} to {out}:")
  for path in sorted(out.iterdir()):
    print(f"  {path}  ({path.stat().length:,} bytes)")


if __name__ == "__main__":
  app.run(main)
