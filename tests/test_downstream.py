"""Downstream: export and load the encoder, fine-tune, linear probe; all on tiny models."""
import json
import os

import jax
import numpy as np
import pytest

from mae_jax import models
from mae_jax.interop import export
from mae_jax.configs import finetune as finetune_config
from mae_jax.configs import linprobe as linprobe_config
from mae_jax.training import config_checks, trainer
from mae_jax.training.tasks import finetune

pytestmark = pytest.mark.slow  # subprocesses, pods, TPU compiles or training runs

# `pretrained`, the tiny pre-training workdir, is a session fixture in conftest.py.


def _downstream(variant_module, task_overrides, init):
  c = variant_module.get_config("fashion_mnist")
  c.model.name = "vit_test_patch4"
  c.init = init
  c.batch_size = 64
  c.mesh.data = 8
  for k, v in task_overrides.items():
    c[k] = v
  return c


def test_export_and_load_encoder_give_the_pretrained_features(pretrained, tmp_path):
  out = str(tmp_path / "encoder")
  export.export_encoder(pretrained, out)
  assert sorted(os.listdir(out)) == ["config.json", "encoder.msgpack", "encoder.safetensors"]
  _, _, params = export.restore_pretrain_params(pretrained)
  mae = models.create_model("mae_vit_test_patch4")
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  expected = mae.apply({"params": params}, images, method=mae.encode)
  for source in (out, pretrained):
    module, enc = export.load_encoder(source)
    assert "decoder_embed" not in enc and "mask_token" not in enc
    got = module.apply({"params": enc}, images, method=module.encode)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
  # The safetensors file holds official key names only for the encoder.
  from safetensors.numpy import load_file
  keys = set(load_file(os.path.join(out, "encoder.safetensors")))
  assert "blocks.0.attn.qkv.weight" in keys and "pos_embed" in keys
  assert not any(k.startswith("decoder") for k in keys)


def test_linear_probe_learns_above_chance_and_keeps_the_encoder_frozen(pretrained, tmp_path):
  config = _downstream(linprobe_config, dict(total_steps=60, warmup_steps=5, eval_every_steps=60,
                                             base_lr=25.0), pretrained)
  result = trainer.run(config, str(tmp_path / "probe"))
  # 10 classes: chance is 0.1, and over 10,000 eval images its spread is about 0.003.
  assert result["eval_top1"] > 0.15
  # The encoder in the probe's checkpoint is the pre-trained one, bit for bit.
  _, _, params = export.restore_pretrain_params(pretrained)
  import orbax.checkpoint as ocp
  with ocp.CheckpointManager(str(tmp_path / "probe" / "checkpoints")) as mngr:
    state = mngr.restore(mngr.latest_step())
  np.testing.assert_array_equal(state["encoder"]["blocks_0"]["mlp"]["fc1"]["kernel"],
                                params["blocks_0"]["mlp"]["fc1"]["kernel"])


def test_finetune_trains_evaluates_and_keeps_best(pretrained, tmp_path):
  config = _downstream(finetune_config, dict(total_steps=20, warmup_steps=2, eval_every_steps=10),
                       pretrained)
  workdir = tmp_path / "ft"
  result = trainer.run(config, str(workdir))
  assert 0.0 <= result["eval_top1"] <= result["eval_top5"] <= 1.0
  assert result["eval_top1"] > 0.15
  assert os.listdir(workdir / "best")
  records = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  assert [r["step"] for r in records if "eval_top1" in r] == [10, 20]


def test_mismatched_init_is_refused(pretrained, tmp_path):
  config = _downstream(finetune_config, dict(total_steps=2), pretrained)
  config.model.name = "vit_small_patch4"
  with pytest.raises(ValueError, match="choose the classifier of the pre-trained size"):
    trainer.run(config, str(tmp_path / "bad"))


@pytest.mark.parametrize("trainable_blocks,trained", [
    (0, {"fc_norm", "head"}), (1, {"blocks_1", "fc_norm", "head"}),
    (-1, {"patch_embed", "cls_token", "pos_embed", "blocks_0", "blocks_1", "fc_norm", "head"})])
def test_partial_finetuning_trains_exactly_the_last_blocks(trainable_blocks, trained):
  from mae_jax import sharding
  config = _downstream(finetune_config, dict(total_steps=10, warmup_steps=1,
                                             trainable_blocks=trainable_blocks, base_lr=1e-2),
                       init="")
  config.batch_size = 16
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  train_program, _ = finetune.build_program(config, mesh, steps_per_epoch=10, num_classes=10)
  state = train_program.create_state()
  before = jax.device_get(state["params"])
  rng = np.random.default_rng(0)
  batch = {"image": rng.standard_normal((16, 32, 32, 3)).astype(np.float32),
           "label": rng.integers(0, 10, 16).astype(np.int32)}
  with jax.set_mesh(mesh):
    for _ in range(3):
      state, _ = train_program.train_step(state, batch)
  after = jax.device_get(state["params"])
  assert set(after) == set(trained) | set(before) - set(trained)
  for name in before:
    same = [a.tobytes() == b.tobytes() for a, b in zip(jax.tree_util.tree_leaves(before[name]),
                                                       jax.tree_util.tree_leaves(after[name]))]
    assert all(same) if name not in trained else not any(same), name
  # The optimizer holds moments for the trained parameters only.
  leaves = jax.tree_util.tree_flatten_with_path(state["opt"])[0]
  named = {k.key for path, _ in leaves for k in path
           if isinstance(getattr(k, "key", None), str) and k.key in before}
  assert named == trained


def test_partial_finetuning_refuses_more_blocks_than_the_model_has():
  config = _downstream(finetune_config, dict(trainable_blocks=3), init="")
  with pytest.raises(ValueError, match="config.trainable_blocks=3.*0 to 2"):
    config_checks.check(config, 1, 8)
