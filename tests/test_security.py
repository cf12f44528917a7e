"""A checkpoint file never runs code: a crafted .pth is refused by every reader (Python API and
command lines) unless the explicit opt-in is given, official training checkpoints still load, and
exported directories are read only from inside themselves. The .pth files are written by torch.save
in the PyTorch reference interpreter (tests/torch_side.py); mae_jax reads them without torch."""
import argparse
import logging
import os
import shlex
import shutil
import subprocess
import sys

import jax
import pytest

import mae_jax
from configs import finetune as finetune_config
from configs import linprobe as linprobe_config
from mae_jax.interop import convert, export, safe_load
from mae_jax.tools import convert as convert_tool
from mae_jax.tools import visualize
from tests.torch_reference import assert_same_tree, from_reference
from tests.helpers import MODEL, REPO, assert_same_state, random_official, run_tool, tiny


@pytest.fixture(name="state")
def fixture_state():
  return random_official(tiny(), "full")


def write_crafted(torch_ref, folder, state, name, legacy=False):
  """(path, marker): a loadable official checkpoint whose pickle also creates `marker`."""
  marker = str(folder / "code-ran")
  path = str(folder / name)
  torch_ref.call("save_running", path=path, obj={"model": state},
                 command=f"touch {shlex.quote(marker)}", legacy=legacy)
  return path, marker


@pytest.fixture(name="crafted")
def fixture_crafted(tmp_path, state, torch_ref):
  return write_crafted(torch_ref, tmp_path, state, "mae_visualize_vit_test.pth")


def assert_refusal(message, path):
  assert f"Refused to load {path}" in message
  assert "posix.system" in message  # what the file asked for
  assert "--allow_unsafe_pickle" in message and "allow_unsafe_pickle=True" in message
  assert f"--to {path[:-len('.pth')]}.safetensors" in message


@pytest.mark.slow
def test_python_api_refuses_a_pickle_that_runs_code(crafted, tmp_path, monkeypatch):
  path, marker = crafted
  # torch's switch for skipping weights_only has no say here either.
  monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
  loaders = {
      "read_state_dict": lambda: convert.read_state_dict(path),
      "load_official": lambda: convert.load_official(path, tiny()),
      "mae_jax.load_encoder": lambda: mae_jax.load_encoder(path, MODEL),
      "export.load_encoder_params": lambda: export.load_encoder_params(path, MODEL),
      "export.export_official": lambda: export.export_official(path, MODEL,
                                                               str(tmp_path / "out")),
  }
  for name, load in loaders.items():
    with pytest.raises(convert.UnsafeCheckpointError) as error:
      load()
    assert isinstance(error.value, ValueError), name
    assert_refusal(str(error.value), path)
    assert not os.path.exists(marker), name
  assert not os.path.exists(tmp_path / "out")
  with pytest.raises(convert.UnsafeCheckpointError, match="its pickle names posix.system"):
    export.check_official_pickle(path)  # the scan before any compute, no tensor read
  export.check_official_pickle(path, allow_unsafe_pickle=True)
  assert not os.path.exists(marker)
  assert "torch" not in sys.modules  # all of it without PyTorch


@pytest.mark.slow
def test_the_legacy_pth_format_and_torchscript_are_refused_too(tmp_path, state, torch_ref):
  path, marker = write_crafted(torch_ref, tmp_path, state, "legacy.pth", legacy=True)
  with pytest.raises(convert.UnsafeCheckpointError, match="its pickle names posix.system"):
    export.check_official_pickle(path)  # the scan reads the legacy format too
  with pytest.raises(convert.UnsafeCheckpointError) as error:
    convert.load_official(path, tiny())
  assert_refusal(str(error.value), path)
  assert not os.path.exists(marker)

  scripted = str(tmp_path / "scripted.pth")
  torch_ref.call("save_torchscript", path=scripted)
  for read in (convert.read_state_dict, export.check_official_pickle):
    with pytest.raises(convert.UnsafeCheckpointError, match="it is a TorchScript archive"):
      read(scripted)
  with pytest.raises(ValueError, match="a program, not a state_dict"):  # nothing to opt into
    convert.read_state_dict(scripted, allow_unsafe_pickle=True)


@pytest.mark.slow
def test_an_official_training_checkpoint_loads_without_the_opt_in(tmp_path, state, caplog,
                                                                  torch_ref):
  """misc.save_model's layout: model, optimizer, epoch, scaler and the argparse args."""
  args = argparse.Namespace(model=MODEL, batch_size=64, epochs=400, blr=1.5e-4, lr=None,
                            mask_ratio=0.75, norm_pix_loss=True, input_size=32, device="cuda",
                            output_dir="./output_dir", resume="", distributed=False)
  path = str(tmp_path / "checkpoint-399.pth")
  torch_ref.call("save_training_checkpoint", path=path, model=state, args=args)
  export.check_official_pickle(path)  # fine-tuning from it passes the check before compute
  with caplog.at_level(logging.WARNING):
    params = convert.load_official(path, tiny())
  assert_same_state(convert.to_official(params, tiny()), state)
  assert not caplog.records  # no opt-in taken
  # Every entry as torch.load(weights_only=True) reads it: AdamW's state, the scaler, the args.
  checkpoint = safe_load.torch_load(path)
  assert checkpoint["args"] == args and checkpoint["epoch"] == 399
  assert_same_tree(checkpoint, from_reference(torch_ref.call("load", path=path)))


@pytest.mark.slow
def test_the_opt_in_runs_the_pickle_and_says_so(crafted, state, caplog):
  path, marker = crafted
  with caplog.at_level(logging.WARNING, logger=safe_load.__name__):
    params = convert.load_official(path, tiny(), allow_unsafe_pickle=True)
  assert os.path.exists(marker)
  assert_same_state(convert.to_official(params, tiny()), state)
  assert [r.levelname for r in caplog.records] == ["WARNING"]
  assert path in caplog.records[0].getMessage()


def _finetune_config(init):
  config = finetune_config.get_config()
  config.model.name, config.batch_size = "vit_test_patch4", 64
  config.init, config.init_model = init, MODEL
  return config


@pytest.mark.slow
def test_finetune_and_linprobe_init_refuse_unless_the_config_opts_in(crafted):
  from mae_jax.models import vit_classifier  # pylint: disable=import-outside-toplevel
  from mae_jax.training.tasks import classification  # pylint: disable=import-outside-toplevel
  from mae_jax.training import config_checks  # pylint: disable=import-outside-toplevel
  path, marker = crafted
  assert linprobe_config.get_config().init_allow_unsafe_pickle is False
  config = _finetune_config(path)
  assert config.init_allow_unsafe_pickle is False
  with pytest.raises(convert.UnsafeCheckpointError) as error:  # before any compute
    config_checks.check(config, 1, 8)
  assert_refusal(str(error.value), path)
  classifier = vit_classifier.create_classifier(config.model.name, 10, img_size=32)
  with pytest.raises(convert.UnsafeCheckpointError):  # and when it loads
    classification.load_init(config, classifier, jax.random.key(0))
  assert not os.path.exists(marker)

  config.init_allow_unsafe_pickle = True
  config_checks.check(config, 1, 8)
  _, report = classification.load_init(config, classifier, jax.random.key(0))
  assert os.path.exists(marker) and "blocks_0/mlp/fc1/kernel" in report.copied


@pytest.mark.slow
def test_main_refuses_a_finetune_init_that_runs_code(crafted, tmp_path):
  path, marker = crafted
  result = subprocess.run(
      [sys.executable, "-m", "mae_jax.main", "--config=configs/finetune.py:fashion_mnist",
       f"--workdir={tmp_path / 'ft'}", f"--config.init={path}", f"--config.init_model={MODEL}",
       "--config.model.name=vit_test_patch4", "--config.batch_size=64"],
      cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode != 0
  assert "UnsafeCheckpointError" in result.stderr
  assert_refusal(result.stderr, path)
  assert not os.path.exists(marker) and not os.path.exists(tmp_path / "ft")  # refused up front


@pytest.mark.slow
def test_convert_command_line_refuses_unless_allow_unsafe_pickle(crafted, state, tmp_path,
                                                                 capsys):
  path, marker = crafted
  copy = str(tmp_path / "copy.safetensors")
  assert convert_tool.main(["--from", path, "--to", copy]) == 1
  assert_refusal(capsys.readouterr().err, path)
  assert not os.path.exists(marker) and not os.path.exists(copy)
  # The way on that the refusal names: a .safetensors copy, which then loads without the opt-in.
  assert convert_tool.main(["--from", path, "--to", copy, "--allow_unsafe_pickle"]) == 0
  assert os.path.exists(marker)
  assert_same_state(convert.read_state_dict(copy), state)


@pytest.mark.slow
def test_export_encoder_command_line_refuses_unless_allow_unsafe_pickle(crafted, tmp_path):
  path, marker = crafted
  args = [f"--init={path}", f"--model={MODEL}", f"--output={tmp_path / 'encoder'}"]
  result = run_tool("export_encoder", *args)
  assert result.returncode == 1, result.stderr
  assert "error: Refused to load" in result.stderr and "Traceback" not in result.stderr
  assert_refusal(result.stderr, path)
  assert not os.path.exists(marker) and not os.path.exists(tmp_path / "encoder")

  result = run_tool("export_encoder", *args, "--allow_unsafe_pickle")
  assert result.returncode == 0, result.stderr
  assert f"allow_unsafe_pickle: unpickling {path} in full" in result.stderr
  assert os.path.exists(marker)
  _, params = mae_jax.load_encoder(str(tmp_path / "encoder"))
  assert "blocks_0" in params


@pytest.mark.slow
def test_visualize_refuses_unless_allow_unsafe_pickle(crafted, state, tmp_path):
  path, marker = crafted
  result = run_tool("visualize", f"--init={path}", f"--model={MODEL}",
                    f"--image={tmp_path / 'a.png'}", f"--out={tmp_path / 'fig.png'}")
  assert result.returncode == 1, result.stderr
  assert "error: Refused to load" in result.stderr and "Traceback" not in result.stderr
  assert_refusal(result.stderr, path)
  assert not os.path.exists(marker)
  # The opt-in in-process (a second run of the tool would cost a TensorFlow import): what
  # --allow_unsafe_pickle passes on.
  _, params, _, _ = visualize.load_mae(path, MODEL, allow_unsafe_pickle=True)
  assert os.path.exists(marker)
  assert_same_state(convert.to_official(params, tiny()), state)


@pytest.fixture(name="exported")
def fixture_exported(tmp_path):
  model = tiny()
  params = convert.from_official(random_official(model, "encoder"), model)
  out = str(tmp_path / "encoder")
  export.save_encoder(out, params, MODEL, {})
  return out


@pytest.mark.parametrize("name", [export.PARAMS_FILE, export.CONFIG_FILE])
def test_exported_files_that_link_outside_their_directory_are_refused(exported, tmp_path, name):
  outside = str(tmp_path / f"elsewhere-{name}")
  shutil.move(os.path.join(exported, name), outside)
  os.symlink(outside, os.path.join(exported, name))
  with pytest.raises(convert.UnsafeCheckpointError, match=f"links to {outside}, outside"):
    mae_jax.load_encoder(exported)


def test_links_that_stay_inside_are_read(exported, tmp_path):
  linked_dir = str(tmp_path / "linked")
  os.symlink(exported, linked_dir)  # the directory itself may be a link
  os.rename(os.path.join(exported, export.PARAMS_FILE), os.path.join(exported, "real.msgpack"))
  os.symlink("real.msgpack", os.path.join(exported, export.PARAMS_FILE))
  _, params = mae_jax.load_encoder(linked_dir)
  assert "blocks_0" in params


def test_converted_directory_links_outside_are_refused(tmp_path, state):
  directory = str(tmp_path / "converted")
  convert.save_converted(directory, convert.from_official(state, tiny()), MODEL)
  outside = str(tmp_path / "params.msgpack")
  shutil.move(os.path.join(directory, "params.msgpack"), outside)
  os.symlink(outside, os.path.join(directory, "params.msgpack"))
  with pytest.raises(convert.UnsafeCheckpointError, match="outside"):
    convert.load_converted(directory)
