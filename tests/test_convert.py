"""Checkpoint conversion: parity with Hugging Face's PyTorch ViTMAE, exact round trips, errors.

The parity tests load the same random weights into transformers' ViTMAEForPreTraining (a PyTorch
MAE written independently of this project, run in the reference interpreter: tests/torch_side.py)
and, through official key names and our converter, into our model; both get the same images and
masking noise. Two geometries: a small one, and mae_vit_base_patch16 at full depth (12 + 8 blocks,
224 px) with mask ratio 0.6.
"""
import argparse
import functools
import json
import logging
import os
import sys
import warnings

import jax
import numpy as np
import pytest

from mae_jax import models
from mae_jax.interop import convert
from mae_jax.tools import convert as convert_tool
from tests.helpers import assert_same_state, init, random_official, tiny

# 64-d encoder with 4 heads, 2 blocks; 32-d decoder with 2 blocks.
SMALL = dict(name="mae_vit_test_patch4",
             overrides=dict(embed_dim=64, num_heads=4, decoder_depth=2, mask_ratio=0.75),
             hf=dict(image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=2,
                     num_attention_heads=4, intermediate_size=256, decoder_hidden_size=32,
                     decoder_num_hidden_layers=2, decoder_num_attention_heads=2,
                     decoder_intermediate_size=128, mask_ratio=0.75))
BASE = dict(name="mae_vit_base_patch16", overrides=dict(mask_ratio=0.6),
            hf=dict(image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12,
                    num_attention_heads=12, intermediate_size=3072, decoder_hidden_size=512,
                    decoder_num_hidden_layers=8, decoder_num_attention_heads=16,
                    decoder_intermediate_size=2048, mask_ratio=0.6))
GEOMETRIES = {"small": SMALL, "base": BASE}
MAX_REL_ERROR = 1e-5


def flat_params(params):
  return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


# ---------------------------------------------------------------------------------------------
# Official key names and shapes (REFERENCE section 2).
# ---------------------------------------------------------------------------------------------
def test_official_keys_and_shapes_of_vit_base():
  model = models.create_model("mae_vit_base_patch16")
  full = convert.official_shapes(model, "full")
  encoder = convert.official_shapes(model, "encoder")
  assert len(encoder) == 6 + 12 * 12 == 150
  assert len(full) == 150 + 104
  assert set(encoder) < set(full)
  expected = {
      "cls_token": (1, 1, 768), "pos_embed": (1, 197, 768),
      "patch_embed.proj.weight": (768, 3, 16, 16), "patch_embed.proj.bias": (768,),
      "blocks.11.attn.qkv.weight": (2304, 768), "blocks.11.attn.qkv.bias": (2304,),
      "blocks.0.attn.proj.weight": (768, 768), "blocks.0.mlp.fc1.weight": (3072, 768),
      "blocks.0.mlp.fc2.weight": (768, 3072), "blocks.0.norm1.weight": (768,), "norm.bias": (768,),
      "mask_token": (1, 1, 512), "decoder_pos_embed": (1, 197, 512),
      "decoder_embed.weight": (512, 768), "decoder_blocks.7.attn.qkv.weight": (1536, 512),
      "decoder_blocks.7.mlp.fc1.weight": (2048, 512), "decoder_norm.weight": (512,),
      "decoder_pred.weight": (768, 512), "decoder_pred.bias": (768,),
  }
  for key, shape in expected.items():
    assert full[key] == shape, key
  assert "blocks.12.norm1.weight" not in full and "decoder_blocks.8.norm1.weight" not in full


def test_checkpoint_kind():
  model = tiny()
  assert convert.checkpoint_kind(random_official(model, "full")) == "full"
  assert convert.checkpoint_kind(random_official(model, "encoder")) == "encoder"
  assert convert.checkpoint_kind(random_official(model, "classifier")) == "classifier"


# ---------------------------------------------------------------------------------------------
# Exact round trips.
# ---------------------------------------------------------------------------------------------
def test_full_checkpoint_round_trip_is_exact():
  model = tiny()
  state = random_official(model, "full")
  params = convert.from_official(state, model)
  abstract = flat_params(jax.eval_shape(lambda: models.init_params(model, jax.random.key(0))))
  loaded = flat_params(params)
  assert {k: v.shape for k, v in loaded.items()} == {k: v.shape for k, v in abstract.items()}
  # The documented layouts, spot-checked against the official tensors.
  d, heads = model.embed_dim, model.num_heads
  np.testing.assert_array_equal(
      params["blocks_1"]["attn"]["qkv"]["kernel"],
      state["blocks.1.attn.qkv.weight"].T.reshape(d, 3, heads, d // heads))
  np.testing.assert_array_equal(params["patch_embed"]["kernel"],
                                state["patch_embed.proj.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(params["decoder_blocks_0"]["mlp"]["fc1"]["kernel"],
                                state["decoder_blocks.0.mlp.fc1.weight"].T)
  exported = convert.to_official(params, model)
  assert_same_state(exported, state)
  assert_same_state(convert.to_official(params, model, encoder_only=False), state)
  # Owned, writable, C-ordered arrays (torch.from_numpy and safetensors need them); no aliasing.
  for key, value in exported.items():
    assert value.flags.writeable and value.flags.c_contiguous, key
  assert not np.shares_memory(params["cls_token"], state["cls_token"])
  assert not np.shares_memory(exported["norm.bias"], params["norm"]["bias"])
  encoder_keys = convert.official_shapes(model, "encoder")
  assert_same_state(convert.to_official(params, model, encoder_only=True),
                    {k: v for k, v in state.items() if k in encoder_keys})


def test_params_round_trip_is_exact():
  model = tiny()
  params = init(model, 3)
  back = convert.from_official(convert.to_official(params, model), model)
  expected = flat_params(params)
  found = flat_params(back)
  assert sorted(found) == sorted(expected)
  for key, value in expected.items():
    np.testing.assert_array_equal(found[key], value, err_msg=key)


def test_encoder_only_checkpoint_round_trip_and_merge():
  model = tiny()
  state = random_official(model, "encoder")
  params = convert.from_official(state, model)
  assert not any(k.startswith(("decoder_", "mask_token")) for k in params)
  assert_same_state(convert.to_official(params, model), state)
  assert_same_state(convert.to_official(params, model, encoder_only=True), state)
  with pytest.raises(ValueError, match="no decoder"):
    convert.to_official(params, model, encoder_only=False)

  fresh = init(model, 1)
  merged = convert.merge_into(fresh, params)
  flat_merged, flat_init, flat_loaded = map(flat_params, (merged, fresh, params))
  assert sorted(flat_merged) == sorted(flat_init)
  for key, value in flat_merged.items():
    np.testing.assert_array_equal(value, flat_loaded.get(key, flat_init[key]), err_msg=key)
  assert_same_state(convert.to_official(merged, model, encoder_only=True), state)
  images = np.random.default_rng(0).standard_normal((1, 32, 32, 3)).astype(np.float32)
  loss, _, _ = jax.jit(lambda p, x, n: model.apply({"params": p}, x, noise=n))(
      merged, images, np.random.default_rng(1).random((1, model.num_patches), np.float32))
  assert np.isfinite(loss)
  with pytest.raises(ValueError, match="blocks_0/norm1/scale"):
    convert.merge_into(fresh, {"blocks_0": {"norm1": {"scale": np.zeros(7, np.float32)}}})


@pytest.mark.parametrize("head", ["global_pool", "cls_token"])
def test_classifier_checkpoint_round_trip(head):
  model = tiny()
  state = random_official(model, "classifier")
  if head == "cls_token":  # norm -> cls -> head; no fc_norm
    state["norm.weight"] = state.pop("fc_norm.weight")
    state["norm.bias"] = state.pop("fc_norm.bias")
  params = convert.from_official(state, model)
  expected_top = {"cls_token", "pos_embed", "patch_embed", "blocks_0", "blocks_1", "head",
                  "fc_norm" if head == "global_pool" else "norm"}
  assert set(params) == expected_top
  np.testing.assert_array_equal(params["pos_embed"], state["pos_embed"])
  np.testing.assert_array_equal(params["head"]["kernel"], state["head.weight"].T)
  assert params["head"]["kernel"].shape == (model.embed_dim, 10)
  if head == "global_pool":
    np.testing.assert_array_equal(params["fc_norm"]["scale"], state["fc_norm.weight"])
  assert_same_state(convert.to_official(params, model), state)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_files_round_trip(tmp_path, suffix):
  model = tiny()
  state = random_official(model, "full")
  params = convert.from_official(state, model)
  path = str(tmp_path / f"mae{suffix}")
  convert.save_official(params, model, path)
  assert_same_state(convert.read_state_dict(path), state)
  assert_same_state(convert.to_official(convert.load_official(path, model), model), state)
  convert.save_official(params, model, path, encoder_only=True)
  assert sorted(convert.read_state_dict(path)) == sorted(convert.official_shapes(model, "encoder"))


@pytest.mark.slow
def test_saved_pth_is_what_torch_load_reads(tmp_path, torch_ref):
  """The release layout, {"model": state_dict} of tensors, bit for bit through
  torch.load(weights_only=True)."""
  model = tiny()
  state = random_official(model, "full")
  path = str(tmp_path / "mae.pth")
  convert.save_official(convert.from_official(state, model), model, path)
  raw = torch_ref.call("load", path=path)  # tensors come back as numpy arrays
  assert set(raw) == {"model"}
  assert_same_state(raw["model"], state)


@pytest.mark.slow
def test_training_checkpoint_with_args_loads_without_unsafe_unpickling(tmp_path, torch_ref, caplog):
  model = tiny()
  state = random_official(model, "full")
  path = str(tmp_path / "checkpoint-399.pth")
  torch_ref.call("save", path=path, obj={"model": state, "epoch": 399,
                                         "args": argparse.Namespace(model="mae_vit_test_patch4")})
  with warnings.catch_warnings(), caplog.at_level(logging.WARNING):
    warnings.simplefilter("error")
    params = convert.load_official(path, model)
  assert not caplog.records  # the allow_unsafe_pickle fallback warns
  assert_same_state(convert.to_official(params, model), state)


@pytest.mark.slow
def test_pth_needs_no_torch_but_unpickling_torch_objects_does(tmp_path, torch_ref, monkeypatch):
  model = tiny()
  state = random_official(model)
  with_module = str(tmp_path / "with_module.pth")  # a whole nn.Linear besides the state_dict
  torch_ref.call("save_with_module", path=with_module, obj={"model": state})
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
  for suffix in (".pth", ".safetensors"):
    path = str(tmp_path / f"mae{suffix}")
    convert.save_official(convert.from_official(state, model), model, path)
    assert_same_state(convert.read_state_dict(path), state)
  with pytest.raises(convert.UnsafeCheckpointError,
                     match=r"its pickle names torch\.nn\.modules\.linear\.Linear"):
    convert.read_state_dict(with_module)
  with pytest.raises(ImportError, match=r"in full needs PyTorch: pip install torch==2\.13\.0"):
    convert.read_state_dict(with_module, allow_unsafe_pickle=True)


# ---------------------------------------------------------------------------------------------
# Errors that name what is wrong.
# ---------------------------------------------------------------------------------------------
def test_missing_unexpected_and_wrong_shape_keys_are_named():
  model = tiny()
  state = random_official(model, "full")
  del state["blocks.1.mlp.fc2.bias"]
  state["blocks.0.attn.qkv.extra"] = np.zeros(3, np.float32)
  state["decoder_blocks.0.attn.qkv.weight"] = np.zeros((10, 32), np.float32)
  with pytest.raises(ValueError) as error:
    convert.from_official(state, model)
  message = str(error.value)
  assert "missing keys (1)" in message and "blocks.1.mlp.fc2.bias" in message
  assert "unexpected keys (1)" in message and "blocks.0.attn.qkv.extra" in message
  assert "decoder_blocks.0.attn.qkv.weight: expected (96, 32), found (10, 32)" in message


def test_wrong_size_hint_names_the_checkpoint_model():
  large = convert.official_shapes(models.create_model("mae_vit_large_patch16"), "full")
  # Zero-stride views: the shapes of a ViT-L checkpoint without its memory.
  state = {k: np.broadcast_to(np.float32(0), shape) for k, shape in large.items()}
  with pytest.raises(ValueError) as error:
    convert.from_official(state, models.create_model("mae_vit_base_patch16"))
  message = str(error.value)
  assert "blocks.0.attn.qkv.weight: expected (2304, 768), found (3072, 1024)" in message
  assert "unexpected keys (144)" in message
  assert "blocks.12-23.* (all 12 keys of each block)" in message
  assert "looks like a mae_vit_large_patch16 checkpoint" in message
  assert "you built mae_vit_base_patch16" in message


def test_decoder_depth_mismatch_hint():
  state = random_official(tiny(decoder_depth=2), "full")
  with pytest.raises(ValueError, match=r"(?s)unexpected.*decoder_blocks\.1\.\*.*decoder_depth=2"):
    convert.from_official(state, tiny())


@pytest.mark.parametrize("table", ["pos_embed", "decoder_pos_embed"])
def test_fixed_table_that_differs_is_refused(table):
  model = tiny()
  state = random_official(model, "full")
  state[table] = state[table].copy()
  state[table][0, 5, 3] += 1e-4
  with pytest.raises(ValueError, match=f"checkpoint's {table} is not the fixed 2-D sin-cos"):
    convert.from_official(state, model)
  state[table][0, 5, 3] -= 1e-4 - 5e-7  # within the tolerance for float32 round-off
  convert.from_official(state, model)


def test_insisting_on_a_full_checkpoint_lists_the_decoder():
  model = tiny()
  with pytest.raises(ValueError, match=r"(?s)missing keys.*mask_token.*decoder_pos_embed"):
    convert.from_official(random_official(model, "encoder"), model, kind="full")


def test_params_without_official_name_are_refused():
  model = tiny()
  params = convert.from_official(random_official(model), model)
  params["encoder_mask_token"] = np.zeros((1, 1, model.embed_dim), np.float32)  # an ablation's
  with pytest.raises(ValueError, match="encoder_mask_token"):
    convert.to_official(params, model)


# ---------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------
def test_cli_round_trip(tmp_path, capsys):
  model = tiny(decoder_depth=2)
  state = random_official(model, "full")
  source = str(tmp_path / "official.safetensors")
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  save_file(state, source)
  out_dir = str(tmp_path / "converted")
  assert convert_tool.main(["--from", source, "--model", "mae_vit_test_patch4",
                            "--set", "decoder_depth=2", "--to", out_dir]) == 0
  with open(os.path.join(out_dir, "config.json")) as f:
    config = json.load(f)
  assert config["model"] == "mae_vit_test_patch4" and config["overrides"] == {"decoder_depth": 2}
  assert config["kind"] == "full"
  loaded_model, params, _ = convert.load_converted(out_dir)
  assert loaded_model.decoder_depth == 2

  target = str(tmp_path / "back.safetensors")
  assert convert_tool.main(["--from", out_dir, "--to", target]) == 0
  assert_same_state(convert.read_state_dict(target), state)
  assert convert_tool.main(["--from", out_dir, "--to", target, "--encoder_only"]) == 0
  assert sorted(convert.read_state_dict(target)) == sorted(
      convert.official_shapes(model, "encoder"))

  capsys.readouterr()
  assert convert_tool.main(["--from", source, "--model", "mae_vit_test_patch4",
                            "--to", str(tmp_path / "bad")]) == 1
  assert "decoder_blocks.1.*" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Parity with transformers' ViTMAEForPreTraining.
# ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _hf_official(torch_ref, label):
  """The HF model's random weights (built once in the reference worker) under official names."""
  state = torch_ref.call("hf_state_dict", config=GEOMETRIES[label]["hf"])
  return convert.from_hf_state_dict(state)


# Parity needs the PyTorch reference process, so it is the slow tier's, at both geometries.
@pytest.fixture(params=["small", pytest.param("base", marks=pytest.mark.slow)])
def hf_setup(request, torch_ref):
  return request.param, GEOMETRIES[request.param], _hf_official(torch_ref, request.param)


def _ours(geometry, **overrides):
  return models.create_model(geometry["name"], **{**geometry["overrides"], **overrides})


def _inputs(model, batch=2, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.standard_normal((batch, model.img_size, model.img_size, 3)).astype(np.float32)
  noise = rng.random((batch, model.num_patches)).astype(np.float32)
  return images, noise


def _nchw(images):
  return np.ascontiguousarray(images.transpose(0, 3, 1, 2))


def _rel_error(ours, theirs):
  theirs = np.asarray(theirs, np.float64)
  return float(np.max(np.abs(np.asarray(ours, np.float64) - theirs)) / np.max(np.abs(theirs)))


@pytest.mark.slow
def test_hf_fixed_tables_equal_ours(hf_setup):
  _, geometry, official = hf_setup
  tables = convert.fixed_tables(_ours(geometry))
  for name in ("pos_embed", "decoder_pos_embed"):
    assert official[name].shape == tables[name].shape
    assert np.abs(official[name]).max() > 0.5, f"HF left {name} empty"
    np.testing.assert_allclose(official[name], tables[name], rtol=0, atol=1e-6, err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_parity_with_hf_vitmae(hf_setup, norm_pix_loss, torch_ref):
  label, geometry, official = hf_setup
  model = _ours(geometry, norm_pix_loss=norm_pix_loss)
  params = convert.from_official(official, model, kind="full")
  images, noise = _inputs(model)
  out = torch_ref.call("hf_pretraining", config=geometry["hf"], images=_nchw(images), noise=noise,
                       norm_pix_loss=norm_pix_loss)
  loss, pred, mask = jax.jit(lambda p, x, n: model.apply({"params": p}, x, noise=n))(
      params, images, noise)
  np.testing.assert_array_equal(np.asarray(mask), out["mask"])
  assert mask.sum() == 2 * (model.num_patches - int(model.num_patches * (1 - model.mask_ratio)))
  errors = {"loss": _rel_error(loss, out["loss"]), "pred": _rel_error(pred, out["logits"])}
  print(f"\n[{label}, norm_pix_loss={norm_pix_loss}] max relative error vs HF: {errors}")
  assert max(errors.values()) < MAX_REL_ERROR, errors


@pytest.mark.slow
def test_encoder_features_match_hf_unmasked(torch_ref):
  geometry = GEOMETRIES["small"]
  model = _ours(geometry)
  params = convert.from_official(_hf_official(torch_ref, "small"), model)
  images, _ = _inputs(model)
  out = torch_ref.call("hf_encode_unmasked", config=geometry["hf"], images=_nchw(images))
  assert out["mask"].sum() == 0
  features = model.apply({"params": params}, images, method=model.encode)
  error = _rel_error(features, out["last_hidden_state"])
  print(f"\n[small] encode() max relative error vs HF: {error:.3g}")
  assert error < MAX_REL_ERROR


_LEGACY_HF_NAMES = (  # transformers < 5 module names, still in hub checkpoints
    ("vit.layers.", "vit.encoder.layer."), ("attention.q_proj", "attention.attention.query"),
    ("attention.k_proj", "attention.attention.key"),
    ("attention.v_proj", "attention.attention.value"),
    ("attention.o_proj", "attention.output.dense"), ("mlp.fc1", "intermediate.dense"),
    ("mlp.fc2", "output.dense"))


@pytest.mark.slow
def test_hf_legacy_names_convert_the_same(torch_ref, tmp_path):
  config = GEOMETRIES["small"]["hf"]
  official = _hf_official(torch_ref, "small")
  legacy = {}
  for key, value in torch_ref.call("hf_state_dict", config=config).items():
    for new, old in _LEGACY_HF_NAMES:
      key = key.replace(new, old)
    legacy[key] = value
  assert_same_state(convert.from_hf_state_dict(legacy), official)
  # transformers itself reads these names as the same model.
  reloaded = torch_ref.call("hf_reload", config=config, directory=str(tmp_path), state=legacy)
  assert_same_state(convert.from_hf_state_dict(reloaded), official)
  # load_official reads HF files directly.
  model = _ours(GEOMETRIES["small"])
  assert_same_state(
      convert.to_official(convert.load_official(str(tmp_path / "model.safetensors"), model),
                          model), official)
