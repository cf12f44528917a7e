"""Experiments as data: one file per task (`pretrain.py`, `finetune.py`, `linprobe.py`), each a
`get_config(variant)`, shipped inside the package.

Command lines name them `--config=configs/<task>.py:VARIANT` from any directory: a path that
exists is read as given (your own config file, or the repository's `configs/`, whose files only
point here); `configs/<task>.py` that does not exist is the packaged file. Every field can be
overridden with `--config.KEY=VALUE`; unknown keys and wrong types are refused.
"""
import os

from absl import flags
from ml_collections import config_flags

DIR = os.path.dirname(os.path.abspath(__file__))


def resolve(spec: str) -> str:
  """'configs/pretrain.py:tiny' -> the packaged file (with ':tiny') when no such file is here."""
  path, sep, variant = spec.partition(":")
  packaged = os.path.join(DIR, os.path.basename(path))
  if (not os.path.exists(path) and os.path.dirname(os.path.normpath(path)) == "configs"
      and os.path.isfile(packaged)):
    return packaged + sep + variant
  return spec


class _ResolvingParser:
  """ml_collections' parser of a config file flag, given the resolved path."""

  def __init__(self, parser):
    self._parser = parser

  def parse(self, path):
    return self._parser.parse(resolve(path))

  def __getattr__(self, name):
    return getattr(self._parser, name)


def DEFINE_config_file(  # pylint: disable=invalid-name
    name: str, default: str | None = None, help_string: str = "",
    flag_values: flags.FlagValues = flags.FLAGS, lock_config: bool = True, **kwargs):
  """`ml_collections.config_flags.DEFINE_config_file` (locked by default: typos fail) whose path
  may name a packaged config as `configs/<task>.py[:VARIANT]`."""
  holder = config_flags.DEFINE_config_file(
      name, resolve(default) if default else default, help_string, flag_values=flag_values,
      lock_config=lock_config, **kwargs)
  flag_values[name].parser = _ResolvingParser(flag_values[name].parser)
  return holder
