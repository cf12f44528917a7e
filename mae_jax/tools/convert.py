r"""Converts official MAE checkpoints to mae_jax params, and back.

  # Official .pth / .safetensors (or a transformers ViTMAE file) -> DIR/params.msgpack + config.json
  python -m mae_jax.tools.convert --from mae_visualize_vit_base.pth \
      --model mae_vit_base_patch16 --to DIR
  # Params -> official names; .pth is {"model": state_dict} as the release, .safetensors is flat
  python -m mae_jax.tools.convert --from DIR --to encoder.pth --encoder_only
  # A pickled file -> the same tensors as .safetensors (no pickle: safe to share and load anywhere)
  python -m mae_jax.tools.convert --from checkpoint-399.pth --to checkpoint-399.safetensors

`.pth`/`.pt`/`.bin` files are read without running code from them: one that pickles more than
tensors, plain values and argparse.Namespace is refused unless `--allow_unsafe_pickle` is given
(only for files you trust; copied once to .safetensors, as above, it then loads without it).

`--set name=value` overrides a model field (e.g. `--set decoder_depth=4`); it is recorded in
config.json so the reverse direction rebuilds the same model. In Python, read DIR with
`mae_jax.interop.convert.load_converted(DIR)`, which returns (model, params, config).
"""
import argparse
import ast
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # pylint: disable=g-import-not-at-top
from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

from mae_jax import models  # pylint: disable=g-import-not-at-top
from mae_jax.interop import convert  # pylint: disable=g-import-not-at-top


def _override(text: str):
  name, sep, value = text.partition("=")
  if not sep or not name:
    raise argparse.ArgumentTypeError(f"--set needs name=value, got {text!r}")
  try:
    return name, ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return name, value


def parse_args(argv):
  parser = argparse.ArgumentParser(
      prog="python -m mae_jax.tools.convert", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--from", dest="source", required=True,
                      help="official checkpoint file, or a directory written by this tool")
  parser.add_argument("--to", dest="target", required=True,
                      help="output directory, or a .pth/.safetensors file")
  parser.add_argument("--model", help=f"model name (import): {', '.join(models.MODELS)}")
  parser.add_argument("--set", dest="overrides", action="append", type=_override, default=[],
                      metavar="NAME=VALUE", help="override a model field (import)")
  parser.add_argument("--kind", choices=convert.KINDS,
                      help="insist on a checkpoint kind (import; default: read off the keys)")
  parser.add_argument("--encoder_only", action="store_true",
                      help="export the encoder without the decoder (export)")
  parser.add_argument("--allow_unsafe_pickle", action="store_true",
                      help="read a .pth that pickles arbitrary objects, which runs any code it "
                      "holds: only for files you trust")
  return parser.parse_args(argv)


def import_checkpoint(source, target, model_name, overrides, kind=None,
                      allow_unsafe_pickle=False):
  """Official file -> directory; returns the checkpoint kind."""
  model = models.create_model(model_name, **overrides)
  state_dict = convert.read_state_dict(source, allow_unsafe_pickle)
  if convert.is_hf_state_dict(state_dict):
    state_dict = convert.from_hf_state_dict(state_dict)
  kind = kind or convert.checkpoint_kind(state_dict)
  params = convert.from_official(state_dict, model, kind=kind)
  convert.save_converted(target, params, model_name, overrides, kind=kind,
                         source=os.path.basename(source))
  return kind


def resave_as_safetensors(source, target, allow_unsafe_pickle=False):
  """Checkpoint file -> its state_dict's tensors, as they are, in a .safetensors file; returns
  the number of tensors."""
  state_dict = convert.read_state_dict(source, allow_unsafe_pickle)
  save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, target,
            metadata={"format": "pt"})
  return len(state_dict)


def export_checkpoint(source, target, encoder_only):
  """Directory -> official file; returns the number of keys written."""
  model, params, _ = convert.load_converted(source)
  state_dict = convert.save_official(params, model, target, encoder_only=encoder_only or None)
  return len(state_dict)


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    return _run(args)
  except ValueError as e:  # a checkpoint that does not fit: the message says why, no traceback
    print(f"error: {e}", file=sys.stderr)
    return 1


def _run(args) -> int:
  if os.path.isdir(args.source):
    if args.model or args.overrides or args.kind:
      raise SystemExit("--model/--set/--kind apply to importing; the directory's config.json "
                       "already names the model.")
    count = export_checkpoint(args.source, args.target, args.encoder_only)
    print(f"Wrote {count} official keys to {args.target}")
  elif args.target.endswith(".safetensors"):
    if args.model or args.overrides or args.kind or args.encoder_only:
      raise SystemExit("--model/--set/--kind/--encoder_only do not apply to a file -> .safetensors "
                       "copy, which keeps the tensors as they are; to import for a model, give a "
                       "directory as --to.")
    count = resave_as_safetensors(args.source, args.target, args.allow_unsafe_pickle)
    print(f"Wrote the {count} tensors of {args.source} to {args.target}")
  else:
    if not args.model:
      raise SystemExit("--model is required to import a checkpoint (e.g. mae_vit_base_patch16).")
    if args.encoder_only:
      raise SystemExit("--encoder_only applies to exporting.")
    kind = import_checkpoint(args.source, args.target, args.model, dict(args.overrides), args.kind,
                             args.allow_unsafe_pickle)
    print(f"Converted the {kind} checkpoint {args.source} for {args.model} into {args.target}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
