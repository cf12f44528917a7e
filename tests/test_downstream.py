"""Downstream: export and load the encoder, fine-tune, linear probe; all on tiny models."""
import json
import os

import jax
import numpy as np
import pytest

from configs import finetune as finetune_config
from configs import linprobe as linprobe_config
from mae_jax import export, models
from mae_jax.training import classify

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
  result = classify.train_and_evaluate(config, str(tmp_path / "probe"))
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
  result = classify.train_and_evaluate(config, str(workdir))
  assert 0.0 <= result["eval_top1"] <= result["eval_top5"] <= 1.0
  assert result["eval_top1"] > 0.15
  assert os.listdir(workdir / "best")
  records = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  assert [r["step"] for r in records if "eval_top1" in r] == [10, 20]


def test_mismatched_init_is_refused(pretrained, tmp_path):
  config = _downstream(finetune_config, dict(total_steps=2), pretrained)
  config.model.name = "vit_small_patch4"
  with pytest.raises(ValueError, match="choose the classifier of the pre-trained size"):
    classify.train_and_evaluate(config, str(tmp_path / "bad"))
