"""The export_encoder command line and `mae_jax.load_encoder`, on a tiny pre-trained workdir."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

import mae_jax
from mae_jax import models
from mae_jax.interop import convert, export
from tests.helpers import MODEL, REPO, run_tool

pytestmark = pytest.mark.slow  # the tiny pre-training's workdir, and the commands run as processes


def assert_same_tree(a, b):
  flat_a, flat_b = (dict(jax.tree_util.tree_flatten_with_path(t)[0]) for t in (a, b))
  assert flat_a.keys() == flat_b.keys()
  for path, value in flat_a.items():
    np.testing.assert_array_equal(np.asarray(value), np.asarray(flat_b[path]), err_msg=str(path))


def test_exported_workdir_loads_with_official_names_and_the_same_features(pretrained, tmp_path):
  out = str(tmp_path / "encoder")
  result = run_tool("export_encoder", f"--workdir={pretrained}", f"--output={out}")
  assert result.returncode == 0, result.stderr
  assert f"Wrote the {MODEL} encoder of {pretrained} step 6 to {out}:" in result.stdout
  assert os.path.join(out, "encoder.safetensors") in result.stdout

  _, _, params = export.restore_pretrain_params(pretrained)
  mae = models.create_model(MODEL)
  # Plain safetensors, no mae_jax: exactly the official encoder keys, with the trained values.
  state = load_file(os.path.join(out, "encoder.safetensors"))
  assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight",
          "blocks.1.mlp.fc2.bias", "norm.weight"} <= set(state)
  assert {k: v.shape for k, v in state.items()} == convert.official_shapes(mae, "encoder")
  for key, value in convert.to_official(params, mae, encoder_only=True).items():
    np.testing.assert_array_equal(state[key], value, err_msg=key)

  module, loaded = mae_jax.load_encoder(out)
  assert_same_tree({k: v for k, v in loaded.items() if k != "pos_embed"},
                   export.encoder_only(params))
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  np.testing.assert_allclose(module.apply({"params": loaded}, images, method=module.encode),
                             mae.apply({"params": params}, images, method=mae.encode),
                             rtol=1e-6, atol=1e-6)


def test_import_and_load_encoder_stay_light(pretrained, tmp_path):
  out = str(tmp_path / "encoder")
  export.export_encoder(pretrained, out)
  code = ("import sys, mae_jax\n"
          "heavy = ('jax', 'tensorflow', 'mae_jax.training', 'mae_jax.data')\n"
          "print(sorted(m for m in heavy if m in sys.modules))\n"
          f"module, params = mae_jax.load_encoder({out!r})\n"
          "print(sorted(m for m in heavy[1:] if m in sys.modules), type(module).__name__)\n")
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=600, check=False)
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines() == ["[]", "[] VisionTransformer"]


def test_export_of_an_official_file_and_clear_errors(pretrained, tmp_path):
  _, _, params = export.restore_pretrain_params(pretrained)
  mae = models.create_model(MODEL)
  pth = str(tmp_path / "mae_pretrain_full.pth")
  convert.save_official(params, mae, pth)
  out = str(tmp_path / "from_pth")
  result = run_tool("export_encoder", f"--init={pth}", f"--model={MODEL}", f"--output={out}")
  assert result.returncode == 0, result.stderr
  _, loaded = mae_jax.load_encoder(out)
  assert_same_tree({k: v for k, v in loaded.items() if k != "pos_embed"},
                   export.encoder_only(params))

  missing = str(tmp_path / "no_such_run")
  result = run_tool("export_encoder", f"--workdir={missing}", f"--output={out}")
  assert result.returncode == 1
  assert f"error: No pre-training workdir at {missing}" in result.stderr

  with pytest.raises(FileNotFoundError, match="has no step 3; saved steps: 6"):
    export.export_encoder(pretrained, out, step=3)
  with pytest.raises(ValueError, match="is an exported encoder, not a pre-training workdir"):
    export.export_encoder(out, str(tmp_path / "again"))
  with pytest.raises(FileNotFoundError, match="not a mae_jax pre-training workdir"):
    export.export_encoder(str(tmp_path), str(tmp_path / "again"))
  with pytest.raises(ValueError, match="name its size too"):
    export.export_official(pth, None, str(tmp_path / "again"))
