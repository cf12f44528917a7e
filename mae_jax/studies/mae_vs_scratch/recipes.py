"""The study's configs: a budget, the fine-tunings' starting points, a sweep's values, the blocks
of partial fine-tuning, and a hold-out of the train split for choices of recipe."""
import copy

from absl import app
import ml_collections

from mae_jax.data.config import KNOWN_SPLITS


def with_budget(config, budget: float, steps_per_epoch: int):
  """A copy of `config` whose run is `budget` times as long (total_steps set explicitly)."""
  config = copy.deepcopy(config)
  total = config.total_steps if config.total_steps > 0 else config.num_epochs * steps_per_epoch
  config.total_steps = max(1, round(budget * total))
  return config


def finetune_config(base, init: str, trainable_blocks: int = -1):
  config = copy.deepcopy(base)
  config.init, config.trainable_blocks = init, trainable_blocks
  return config


def parse_sweep(spec: str, pretrain_config) -> tuple[str, list]:
  """'model.mask_ratio=0.25,0.5' -> ('model.mask_ratio', [0.25, 0.5]), typed like the key."""
  key, sep, values = spec.partition("=")
  try:
    current = pretrain_config
    for part in key.split("."):
      current = current[part]
  except (KeyError, AttributeError):
    current = None
  if not sep or not values or current is None or isinstance(current, ml_collections.ConfigDict):
    raise ValueError(f"--sweep={spec!r}: give KEY=V1,V2,... with KEY a pre-training config "
                     "field, e.g. --sweep=model.mask_ratio=0.25,0.5,0.75,0.9.")
  kind = type(current)
  parse = (lambda v: v.lower() in ("1", "true")) if kind is bool else kind
  return key, [parse(v) for v in values.split(",")]


def parse_partial(values, depth: int) -> list[int]:
  """['0', '2', 'all'] -> [0, 2, -1] (-1: every block, the full fine-tuning)."""
  out = []
  for v in values:
    k = -1 if v == "all" else int(v) if v.isdigit() else None
    if k is None or k > depth:
      raise ValueError(f"--partial={','.join(values)}: each value is a number of last blocks, 0 "
                       f"to {depth}, or `all`.")
    out.append(k)
  return out


def hold_out(pretrain_config, finetune_config, count: int, eval_train: int, eval_test: int):
  """(pretrain, finetune configs, eval_train, eval_test) that train on the train split but its
  last `count` images, and evaluate every stage on those: tuning that never reads the test
  split."""
  name, split = pretrain_config.data.name, pretrain_config.data.train_split
  if (name, split) not in KNOWN_SPLITS:
    raise app.UsageError(f"--holdout needs a known train split; {name} {split} is not one of "
                         f"{sorted(k for k in KNOWN_SPLITS if k[0] == name)}.")
  total = KNOWN_SPLITS[(name, split)][0]
  if not 0 < count < total:
    raise app.UsageError(f"--holdout={count} must be between 1 and {total - 1} ({name} train "
                         f"has {total} images).")
  configs_ = []
  for config in (pretrain_config, finetune_config):
    config = copy.deepcopy(config)
    config.data.train_split, config.data.eval_split = f"{split}[:-{count}]", f"{split}[-{count}:]"
    configs_.append(config)
  return (*configs_, min(eval_train, total - count), min(eval_test, count))


def finetune_plan(finetune_base, init_dir: str, blocks: list[int]) -> dict:
  """The fine-tuning stages, name -> config: from MAE and from random init; with `blocks`
  (parse_partial's), fine-tunings of the last K blocks instead (-1: every block, finetune_mae)."""
  plan = {}
  if not blocks or -1 in blocks:
    plan["finetune_mae"] = finetune_config(finetune_base, init_dir)
  if not blocks:
    plan["finetune_random"] = finetune_config(finetune_base, "")
  plan.update({f"partial_{k}": finetune_config(finetune_base, init_dir, k)
               for k in blocks if k >= 0})
  return plan
