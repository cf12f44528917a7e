"""The export_encoder command line and `mae_jax.load_encoder`, on a tiny pre-trained workdir."""
import logging
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

import mae_jax
from mae_jax import models
from mae_jax.interop import convert, export
from tests.helpers import MODEL, REPO, random_official, run_tool, tiny

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


def test_symlinks_at_the_output_are_refused_or_replaced_never_written_through(tmp_path, caplog):
  model = tiny()
  params = convert.from_official(random_official(model, "encoder"), model)
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  # The output itself a link (named with or without a trailing slash): refused, with the fix,
  # before a checkpoint is read (here the workdir does not even exist).
  link = tmp_path / "encoder_link"
  os.symlink(elsewhere, link)
  for output in (str(link), f"{link}/"):
    with pytest.raises(ValueError, match=re.escape(
        f"The output {output} is a symbolic link (to {elsewhere}); the encoder is not written "
        f"through links, which can lead anywhere. Give the directory it leads to as the output "
        f"({elsewhere}), or remove the link.")):
      export.save_encoder(output, params, MODEL, {})
  with pytest.raises(ValueError, match="is a symbolic link"):
    export.export_encoder(str(tmp_path / "no_such_run"), str(link))
  assert not os.listdir(elsewhere)

  # Links in place of its files (one dangling): each replaced by the file; what they led to is
  # left as it was.
  out = tmp_path / "encoder"
  out.mkdir()
  kept = tmp_path / "kept.txt"
  kept.write_text("not an encoder")
  os.symlink(kept, out / export.PARAMS_FILE)
  os.symlink(kept, out / export.CONFIG_FILE)
  os.symlink(tmp_path / "nowhere.safetensors", out / export.SAFETENSORS_FILE)
  with caplog.at_level(logging.WARNING):
    export.save_encoder(str(out), params, MODEL, {})
  assert kept.read_text() == "not an encoder" and not (tmp_path / "nowhere.safetensors").exists()
  assert caplog.text.count("Replaced the symbolic link") == 3
  files = (export.PARAMS_FILE, export.SAFETENSORS_FILE, export.CONFIG_FILE)
  assert sorted(os.listdir(out)) == sorted(files)  # no partial file left
  umask = os.umask(0)
  os.umask(umask)
  assert not [name for name in files if os.path.islink(out / name)]
  for name in (export.PARAMS_FILE, export.CONFIG_FILE):  # as any new file (safetensors: 0600)
    assert os.stat(out / name).st_mode & 0o777 == 0o666 & ~umask, name
  _, loaded = mae_jax.load_encoder(str(out))
  assert_same_tree({k: v for k, v in loaded.items() if k != "pos_embed"},
                   export.encoder_only(params))


@pytest.mark.slow
def test_export_encoder_command_names_a_symlink_output_and_the_fix(tmp_path):
  os.symlink(tmp_path, tmp_path / "link")
  result = run_tool("export_encoder", f"--workdir={tmp_path / 'no_such_run'}",
                    f"--output={tmp_path / 'link'}/")
  assert result.returncode == 1
  assert (f"error: The output {tmp_path / 'link'}/ is a symbolic link (to {tmp_path}); the "
          "encoder is not written through links") in result.stderr
  assert f"Give the directory it leads to as the output ({tmp_path}), or" in result.stderr
