"""Faults a long run meets: kill -9 (also during an async save), a damaged checkpoint, a full or
read-only disk, bad configuration, a pod process that dies, one process of a pod preempted.
Nothing is lost beyond the steps since the last checkpoint, and every failure explains itself.
(SIGTERM to one host is in test_pretrain.py; SIGTERM to a whole pod, and a pod against one
process, in test_gcs_faults.py, on gs://; the non-finite guard and an unwritable workdir in
test_trainer.py, bad images in test_data_*.py; more preemption trials at random moments:
`python -m mae_jax.studies.preemption_trials`.)

Each test prints what it observed; `python -m pytest -q -rP tests/test_reliability.py` shows it.
"""
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tensorflow as tf
from absl import flags

from mae_jax import checkpointing, paths, sharding
from mae_jax.testing import pod_preemption
from mae_jax.training import config_checks, goodput, trainer
from mae_jax.training.tasks import classification, finetune, pretrain
from tests.helpers import REPO, losses, parse, tiny_config

# A restore that fails on a damaged file abandons orbax's other pending array reads; when they are
# garbage-collected later (on a busy machine, sometimes in the next test) they raise on close.
pytestmark = [pytest.mark.filterwarnings(
    f"ignore:{message}:pytest.PytestUnraisableExceptionWarning") for message in (
        r"Exception ignored in. <coroutine object _read_array_index_and_device_put",
        r"Exception ignored in. None[\s\S]*Event loop is closed")] + [pytest.mark.slow]
# One run shape for every test here: 16 steps, a checkpoint every 2 (the same as tiny_config's
# other fields, so the command line and the in-process config are the same run; a given peak
# FLOP/s skips the matmul that measures it).
RUN = {"model.name": "mae_vit_test_patch4", "batch_size": 32, "total_steps": 16,
       "warmup_steps": 4, "base_lr": 0.002, "log_every_steps": 1, "checkpoint_every_steps": 2,
       "keep_checkpoints": 10, "figure_every_steps": 0, "eval_every_steps": 0, "mesh.data": 2,
       "mesh.fsdp": 4, "peak_flops_per_device": 1e11}
TOTAL = RUN["total_steps"]


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
  """Decoded Fashion-MNIST, shared by every run here, in this process and in subprocesses
  (compiled steps are shared through the session's compilation cache, see conftest.py)."""
  return {"data.cache_dir": str(tmp_path_factory.mktemp("caches") / "data")}


def run_config(caches):
  return tiny_config(**RUN, **{"data.cache_dir": caches["data.cache_dir"]})


def command(workdir, caches, main=("-m", "mae_jax.main")):
  return [sys.executable, *main, "--config=configs/pretrain.py:tiny", f"--workdir={workdir}",
          *[f"--config.{k}={v}" for k, v in RUN.items()],
          f"--config.data.cache_dir={caches['data.cache_dir']}"]


def steps_in(checkpoints) -> list[int]:
  return sorted(int(n) for n in os.listdir(checkpoints) if n.isdigit())


def wait_for_step(workdir, step, proc, timeout=300):
  """Waits until metrics.jsonl has a line for `step` (or the process has ended)."""
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    try:
      if max(losses(workdir), default=0) >= step:
        return
    except (FileNotFoundError, json.JSONDecodeError):
      pass
    time.sleep(0.05)
  raise AssertionError(f"step {step} not reached; process status {proc.poll()}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, caches):
  """The unbroken run every fault is compared with: its workdir and {step: loss}."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  trainer.run(run_config(caches), workdir)
  return workdir, losses(workdir)


def restore_target(**overrides):
  """The train state of RUN as the trainer builds it, as a restore target."""
  config = tiny_config(**{**RUN, **overrides})
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  return pretrain.build_program(config, mesh, steps_per_epoch=1000).sharded_abstract_state()


@pytest.fixture(scope="module")
def abstract_state():
  return restore_target()


# ----------------------------------------------------------------------------------------------
# kill -9
KILL_DURING_SAVE = """
import os, signal, sys, time
from absl import app
from mae_jax import main
from mae_jax import checkpointing
save = checkpointing.save

def save_then_die(manager, step, state, force=False):
  saved = save(manager, step, state, force)
  if step == {step}:  # SIGKILL once orbax has begun writing the step, before it is committed
    tmp = lambda: [n for n in os.listdir(manager.directory) if n.startswith("{step}.")]
    while not tmp():
      time.sleep(0.001)
    os.kill(os.getpid(), signal.SIGKILL)
  return saved

checkpointing.save = save_then_die
app.run(main.main)
"""


def test_kill9_at_several_moments_resumes_from_the_newest_complete_checkpoint(
    reference, caches, tmp_path, caplog):
  workdir = tmp_path / "killed"
  checkpoints = workdir / "checkpoints"
  # 1. SIGKILL while the async save of step 6 is being written.
  first = subprocess.run(command(workdir, caches, ("-c", KILL_DURING_SAVE.format(step=6))),
                         cwd=REPO, capture_output=True, text=True, timeout=600)
  assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
  partial = [n for n in os.listdir(checkpoints) if n.startswith("6.")]
  assert partial and steps_in(checkpoints) == [2, 4]   # step 6 exists only half-written
  # 2. The same command, SIGKILLed from outside once step 11 is logged: it may be in step 12 or
  #    in the async save of step 12.
  log = tmp_path / "second.log"
  with open(log, "w") as stderr:
    second = subprocess.Popen(command(workdir, caches), cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=stderr)
    wait_for_step(workdir, 11, second)
    second.kill()
    assert second.wait(timeout=60) == -signal.SIGKILL   # killed, not finished
  complete, logged = steps_in(checkpoints), max(losses(workdir))
  text = log.read_text()
  assert "Resumed from the checkpoint at step 4." in text and "cannot be restored" not in text
  assert not any(n.startswith("6.") for n in os.listdir(checkpoints))  # the partial is gone
  # 3. Once more, to the end (in this process: the command line is the same run).
  with caplog.at_level(logging.INFO):
    trainer.run(run_config(caches), str(workdir))
  resumed_from = max(complete)
  assert f"Resumed from the checkpoint at step {resumed_from}." in caplog.text
  assert "cannot be restored" not in caplog.text
  got, (_, expected) = losses(workdir), reference
  assert sorted(got) == list(range(1, TOTAL + 1))      # one line per step, none repeated
  np.testing.assert_allclose([got[s] for s in got], [expected[s] for s in got], rtol=1e-6)
  print(f"kill -9 during the save of step 6 -> resumed from 4; kill -9 after step {logged} "
        f"logged (checkpoints {complete}) -> resumed from {resumed_from}; "
        f"losses of steps 1-{TOTAL} equal the unbroken run's")


# ----------------------------------------------------------------------------------------------
# Goodput across relaunches
def test_goodput_counts_the_steps_redone_after_a_kill9_and_the_time_stopped(
    reference, caches, tmp_path, monkeypatch):
  workdir = tmp_path / "goodput"
  # 1. kill -9 during the async save of step 6: steps 5 and 6 ran, step 4 is the newest checkpoint.
  first = subprocess.run(command(workdir, caches, ("-c", KILL_DURING_SAVE.format(step=6))),
                         cwd=REPO, capture_output=True, text=True, timeout=600)
  assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
  # 2. The relaunch resumes from step 4; a preemption notice (SIGTERM) comes during step 9.
  real_iterator = trainer.data.create_iterator

  def preempted_at_9(*args, **kwargs):
    for i, batch in enumerate(real_iterator(*args, **kwargs)):
      if kwargs["start_step"] + 1 + i == 9:
        os.kill(os.getpid(), signal.SIGTERM)
      yield batch
  monkeypatch.setattr(trainer.data, "create_iterator", preempted_at_9)
  assert trainer.run(run_config(caches), str(workdir))["preempted"]
  monkeypatch.setattr(trainer.data, "create_iterator", real_iterator)
  # 3. The last relaunch, to the end.
  result = trainer.run(run_config(caches), str(workdir))
  got, (_, expected) = losses(workdir), reference
  assert sorted(got) == list(range(1, TOTAL + 1))     # the clock changes no step
  np.testing.assert_allclose([got[s] for s in got], [expected[s] for s in got], rtol=1e-6)

  records = [json.loads(line) for line in open(workdir / goodput.FILE)]
  summary = goodput.summarise(records)
  assert [(a["start_step"], a["step"], a["outcome"]) for a in summary["attempts"]] == [
      (0, 6, "no end line: still running, or killed"), (4, 9, "preempted"),
      (9, TOTAL, "finished")]
  assert summary["redone_steps"] == 2                 # steps 5 and 6, run again after the kill
  seconds = summary["seconds"]
  assert seconds["redone"] > 0 and seconds["down"] > 0 and seconds["step"] > 0
  assert all(seconds[c] > 0 for c in ("compile", "restore", "checkpoint", "input", "other"))
  assert seconds["eval"] == 0 and seconds["profile"] == 0
  assert summary["total_s"] == pytest.approx(sum(seconds.values()))
  # The last metrics line's goodput so far: before the final save and the closing down.
  assert result["goodput"] == pytest.approx(summary["goodput"], rel=0.25)
  # The end of each run writes the summary to TensorBoard as well.
  tags = {value.tag for path in (workdir / "tensorboard").iterdir()
          for event in tf.compat.v1.train.summary_iterator(str(path))
          for value in event.summary.value}
  assert {"goodput", "badput/redone", "badput/down", "badput/compile"} <= tags
  print("\n".join(goodput.table(summary)))


# ----------------------------------------------------------------------------------------------
# Damaged checkpoints
def _cut_short(step_dir):
  """Every file of the step cut to half its size, as an interrupted copy leaves it."""
  for root, _, files in os.walk(step_dir):
    for name in files:
      path = os.path.join(root, name)
      os.truncate(path, os.path.getsize(path) // 2)


def _bit_flips(step_dir):
  """A flipped bit in every 97th byte of every data file: what each flip hits (array bytes,
  compressed chunks, index nodes) depends on the file layout, which varies between machines, so
  every file is hit and no array of the params escapes (a reader restores only those)."""
  data_dir = os.path.join(step_dir, "default", "ocdbt.process_0", "d")
  for name in os.listdir(data_dir):
    path = os.path.join(data_dir, name)
    data = bytearray(open(path, "rb").read())
    for position in range(0, len(data), 97):
      data[position] ^= 0x08
    with open(path, "wb") as f:
      f.write(bytes(data))


def _metadata_lost(step_dir):
  os.remove(os.path.join(step_dir, "default", "_METADATA"))


def test_arrays_that_read_back_other_bits_are_caught_by_the_checksums(
    reference, abstract_state, tmp_path, caplog, monkeypatch):
  shutil.copytree(os.path.join(reference[0], "checkpoints"), tmp_path / "checkpoints")
  manager = checkpointing.create_manager(str(tmp_path), 2, 10)
  restore = manager.restore

  def silently_wrong(step, *args, **kwargs):  # what a flipped bit orbax cannot see gives
    state = restore(step, *args, **kwargs)
    if step == TOTAL:
      state = dict(state, step=state["step"] + 1)
    return state
  monkeypatch.setattr(manager, "restore", silently_wrong)
  with caplog.at_level(logging.WARNING):
    step, _ = checkpointing.restore_latest(manager, abstract_state)
  assert step == TOTAL - 2
  assert "differ from the checksums saved with them" in caplog.text and "step" in caplog.text


@pytest.mark.parametrize("damage", [_cut_short, _bit_flips, _metadata_lost],
                         ids=["cut_short", "bit_flips", "metadata_lost"])
def test_damaged_latest_step_falls_back_to_the_previous_and_is_kept(
    reference, abstract_state, tmp_path, caplog, damage):
  workdir = tmp_path
  shutil.copytree(os.path.join(reference[0], "checkpoints"), workdir / "checkpoints")
  bad = workdir / "checkpoints" / str(TOTAL)
  damage(bad)
  files = sorted(os.path.relpath(os.path.join(r, n), bad) for r, _, ns in os.walk(bad) for n in ns)
  manager = checkpointing.create_manager(str(workdir), 2, 10)
  with caplog.at_level(logging.WARNING):
    step, state = checkpointing.restore_latest(manager, abstract_state)
  assert step == TOTAL - 2 and int(state["step"]) == TOTAL - 2
  assert f"Checkpoint step {TOTAL} in" in caplog.text and "cannot be restored" in caplog.text
  # Kept, whole, under another name, and out of the way of the resumed run's own step 16.
  moved = [n for n in os.listdir(workdir / "checkpoints") if n.startswith(f"corrupt-{TOTAL}-")]
  assert len(moved) == 1 and "Moved the unreadable checkpoint step" in caplog.text
  aside = workdir / "checkpoints" / moved[0]
  assert sorted(os.path.relpath(os.path.join(r, n), aside)
                for r, _, ns in os.walk(aside) for n in ns) == files
  assert checkpointing.save(manager, TOTAL, state, force=True)
  manager.close()
  assert steps_in(workdir / "checkpoints")[-2:] == [TOTAL - 2, TOTAL]
  print(f"{damage.__name__}: step {TOTAL} -> restored {step}, kept as {moved[0]}")


def _reader_workdir(reference, tmp_path, damage):
  """A copy of the reference workdir (config.json, checkpoints 2..16) with step 16 damaged."""
  workdir = tmp_path / "pretrained"
  workdir.mkdir()
  shutil.copy(os.path.join(reference[0], "config.json"), workdir)
  shutil.copytree(os.path.join(reference[0], "checkpoints"), workdir / "checkpoints")
  damage(workdir / "checkpoints" / str(TOTAL))
  return workdir


@pytest.fixture(scope="module")
def params_before_last(reference):
  """The params of step 14 of the undamaged reference run, as a reader gets them."""
  from mae_jax.interop import export  # pylint: disable=import-outside-toplevel
  _, step, params = export.restore_pretrain_params(reference[0], TOTAL - 2)
  assert step == TOTAL - 2
  return params


def _assert_same_arrays(got, expected):
  got, expected = (dict(jax.tree_util.tree_flatten_with_path(t)[0]) for t in (got, expected))
  assert got.keys() == expected.keys()
  for path, value in expected.items():
    np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(value), err_msg=str(path))


@pytest.mark.parametrize("damage", [_cut_short, _bit_flips, _metadata_lost],
                         ids=["cut_short", "bit_flips", "metadata_lost"])
def test_a_reader_of_a_damaged_latest_step_takes_the_previous_and_moves_nothing(
    reference, params_before_last, tmp_path, caplog, damage):
  from mae_jax.interop import export  # pylint: disable=import-outside-toplevel
  workdir = _reader_workdir(reference, tmp_path, damage)
  with caplog.at_level(logging.WARNING):
    _, step, params = export.restore_pretrain_params(str(workdir))
  assert step == TOTAL - 2
  _assert_same_arrays(params, params_before_last)
  assert f"Checkpoint step {TOTAL} in" in caplog.text and "cannot be restored" in caplog.text
  assert f"Read step {TOTAL - 2} of" in caplog.text and "left in place" in caplog.text
  # Read-only: the training run that owns the workdir moves the step aside when it resumes.
  assert steps_in(workdir / "checkpoints") == list(range(2, TOTAL + 1, 2))
  assert not [n for n in os.listdir(workdir / "checkpoints") if n.startswith("corrupt-")]
  # Asked for by number, the damaged step is an error, not another step.
  with pytest.raises(checkpointing.CheckpointUnreadableError) as err:
    export.restore_pretrain_params(str(workdir), TOTAL)
  assert (f"Checkpoint step {TOTAL} in {workdir / 'checkpoints'} cannot be restored" in
          str(err.value))
  assert "Choose another step (the others saved: 2, 4, 6" in str(err.value)
  print(f"{damage.__name__}: a reader of step {TOTAL} got step {step}'s params, nothing moved; "
        f"--step={TOTAL}: {type(err.value).__name__}")


def test_export_finetune_init_and_visualize_fall_back_past_a_damaged_latest_step(
    reference, params_before_last, tmp_path, caplog):
  from mae_jax.configs import finetune as finetune_config  # pylint: disable=import-outside-toplevel
  from mae_jax import load_encoder  # pylint: disable=import-outside-toplevel
  from mae_jax.interop import export  # pylint: disable=import-outside-toplevel
  from mae_jax.tools import visualize  # pylint: disable=import-outside-toplevel
  workdir = _reader_workdir(reference, tmp_path, _cut_short)
  encoder = export.encoder_only(params_before_last)
  # The export_encoder command line.
  out = tmp_path / "encoder"
  result = subprocess.run([sys.executable, "-m", "mae_jax.tools.export_encoder",
                           f"--workdir={workdir}", f"--output={out}"], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"encoder of {workdir} step {TOTAL - 2} to {out}" in result.stdout
  assert f"Checkpoint step {TOTAL} in" in result.stderr and "cannot be restored" in result.stderr
  _, exported = load_encoder(str(out))
  _assert_same_arrays({k: v for k, v in exported.items() if k != "pos_embed"}, encoder)
  result = subprocess.run([sys.executable, "-m", "mae_jax.tools.export_encoder",
                           f"--workdir={workdir}", f"--step={TOTAL}", f"--output={out}"], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 1
  assert f"error: Checkpoint step {TOTAL} in {workdir / 'checkpoints'} cannot be" in result.stderr
  with caplog.at_level(logging.WARNING):
    # mae_jax.load_encoder(workdir)
    _, loaded = load_encoder(str(workdir))
    _assert_same_arrays({k: v for k, v in loaded.items() if k != "pos_embed"}, encoder)
    # The fine-tuning init (config.init = the workdir).
    config = finetune_config.get_config("fashion_mnist")
    config.model.name, config.init = "vit_test_patch4", str(workdir)
    classifier = finetune.build_classifier(config, 10)
    init, report = classification.load_init(config, classifier, jax.random.key(0))
    copied = sorted(encoder.keys() & init.keys())   # the classifier's own norm is fc_norm
    assert {"patch_embed", "cls_token", "blocks_0", "blocks_1"} <= set(copied)
    _assert_same_arrays({k: init[k] for k in copied}, {k: encoder[k] for k in copied})
    assert any(k.startswith("head") for k in report.fresh)
    # visualize --init=WORKDIR
    _, figure_params, _, _ = visualize.load_mae(str(workdir))
    _assert_same_arrays(figure_params, params_before_last)
  assert caplog.text.count(f"Checkpoint step {TOTAL} in") == 3
  assert steps_in(workdir / "checkpoints")[-1] == TOTAL
  print(f"step {TOTAL} cut short: export_encoder, load_encoder, the fine-tuning init and "
        f"visualize all read step {TOTAL - 2}; --step={TOTAL} exits 1 naming it")


def test_checkpoints_of_another_model_are_refused_not_taken_for_damaged(reference, tmp_path):
  shutil.copytree(os.path.join(reference[0], "checkpoints"), tmp_path / "checkpoints")
  manager = checkpointing.create_manager(str(tmp_path), 2, 10)
  with pytest.raises(checkpointing.CheckpointMismatchError) as err:
    checkpointing.restore_latest(manager, restore_target(**{"model.decoder_depth": 2}))
  manager.close()
  assert f"The checkpoint at step {TOTAL} in" in str(err.value)
  assert "decoder_blocks_1/attn/proj/bias: only in this config" in str(err.value)
  assert "Use a new --workdir for this config" in str(err.value)
  assert steps_in(tmp_path / "checkpoints") == list(range(2, TOTAL + 1, 2))  # nothing moved


# ----------------------------------------------------------------------------------------------
# A full or read-only disk
@pytest.fixture
def tmpfs():
  """mount(path, size): a small tmpfs at `path`, unmounted after the test (root only)."""
  mounted = []

  def mount(path, size="3m"):
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                            capture_output=True, text=True)
    if result.returncode:
      pytest.fail(f"cannot mount a tmpfs here ({result.stderr.strip()}): the tests of a full or "
                  "unwritable disk need root to mount one")
    mounted.append(path)
    return path
  yield mount
  for path in mounted:
    subprocess.run(["umount", "-l", str(path)], check=True)


def test_disk_full_during_a_save_is_named_and_keeps_the_last_step(tmpfs, tmp_path):
  disk = tmpfs(tmp_path / "disk")  # 3 MB: room for one checkpoint of 2 MB
  state = {"w": jax.random.normal(jax.random.key(0), (500_000,)), "step": jax.numpy.int32(1)}
  manager = checkpointing.create_manager(str(disk), 1, 10)
  checkpointing.save(manager, 1, state)
  manager.wait_until_finished()
  with pytest.raises(checkpointing.CheckpointSaveError) as err:
    checkpointing.save(manager, 2, state)
    manager.wait_until_finished()
  assert "Could not save the checkpoint of step 2" in str(err.value)
  assert "No space left on device" in str(err.value)
  assert ("The disk is full: free space there or choose a --workdir with room, then relaunch. "
          "The checkpoints already there are untouched; a relaunch resumes from step 1.") in str(
              err.value)
  step, restored = checkpointing.restore_latest(manager, checkpointing.abstract_like(state))
  manager.close()
  assert step == 1 and np.array_equal(restored["w"], state["w"])
  print("disk full during the save of step 2: CheckpointSaveError, step 1 restores")


def test_unwritable_checkpoints_exit_promptly_with_a_clear_error(tmpfs, reference, caches,
                                                                 tmp_path):
  workdir = tmp_path / "run"
  checkpoints = tmpfs(workdir / "checkpoints")
  shutil.copytree(os.path.join(reference[0], "checkpoints", "2"), checkpoints / "2")
  subprocess.run(["mount", "-o", "remount,ro", str(checkpoints)], check=True)
  start = time.time()
  # The step directory is made before save() returns (checkpointing.create_manager): made in
  # the background, its failure would leave orbax's writer threads waiting for it, and the
  # process could not exit within the timeout.
  result = subprocess.run(command(workdir, caches), cwd=REPO,
                          capture_output=True, text=True, timeout=240)
  seconds = time.time() - start
  assert result.returncode == 1, result.stderr[-3000:]
  assert "Resumed from the checkpoint at step 2." in result.stderr
  assert "CheckpointSaveError: Could not save the checkpoint of step 4" in result.stderr
  assert "Read-only file system" in result.stderr
  assert ("The directory is not writable: fix its permissions or choose another --workdir. The "
          "checkpoints already there are untouched; a relaunch resumes from step 2."
          ) in result.stderr
  assert steps_in(checkpoints) == [2]
  print(f"read-only checkpoint directory at the save of step 4: exit status 1 after {seconds:.0f} "
        "s (start-up included), step 2 untouched")


def test_a_config_or_log_rewrite_that_fails_leaves_the_old_file_whole(tmp_path, monkeypatch):
  path = tmp_path / "config.json"
  path.write_text('{"batch_size": 8}')
  paths.write_atomically(path, '{"batch_size": 16}')
  assert path.read_text() == '{"batch_size": 16}' and os.listdir(tmp_path) == ["config.json"]
  written = type(paths.resolve(path))

  def disk_full(self, text):
    with open(self, "w") as f:
      f.write(text[:3])   # cut short, as a full disk or a kill leaves it
    raise OSError(28, "No space left on device")
  monkeypatch.setattr(written, "write_text", disk_full)
  with pytest.raises(OSError, match="No space left"):
    paths.write_atomically(path, '{"batch_size": 32}')
  assert path.read_text() == '{"batch_size": 16}'


# ----------------------------------------------------------------------------------------------
# Bad configuration: refused by the checks that run before any compute, naming field and fix.
@pytest.fixture(scope="module")
def pretrained_elsewhere(tmp_path_factory):
  """A pre-training workdir of mae_vit_test_patch4, as far as a fine-tuning config can tell."""
  workdir = tmp_path_factory.mktemp("pretrained")
  (workdir / "config.json").write_text(tiny_config(**RUN).to_json_best_effort())
  (workdir / "checkpoints").mkdir()
  return str(workdir)


PRETRAIN = "configs/pretrain.py:tiny"
FINETUNE = "configs/finetune.py:fashion_mnist"
LINPROBE = "configs/linprobe.py:fashion_mnist"
FT = ["--config.model.name=vit_test_patch4", "--config.mesh.data=8", "--config.batch_size=64"]
PT = [f"--config.{k}={v}" for k, v in RUN.items() if k != "total_steps"]


@pytest.mark.parametrize("variant_file, args, message", [
    (PRETRAIN, ["--config.bacth_size=8"], 'Did you mean "batch_size"'),
    (PRETRAIN, ["--config.batch_size=many"], "--config.batch_size=many: invalid literal for int"),
    (PRETRAIN, ["--config.model.norm_pix_loss=maybe"], "--config.model.norm_pix_loss=maybe"),
    (PRETRAIN, PT + ["--config.data.image_size=30"],
     "image_size=30 is not divisible by the patch size 4 of config.model.name="
     "mae_vit_test_patch4; set --config.data.image_size=32"),
    (PRETRAIN, PT + ["--config.data.image_size=28"], "set --config.data.image_size=32"),
    (PRETRAIN, PT + ["--config.model.mask_ratio=1.0"],
     "config.model: mask_ratio must be in [0, 1)"),
    (PRETRAIN, PT + ["--config.model.mask_ratio=-0.1"], "mask_ratio must be in [0, 1), got -0.1"),
    (PRETRAIN, PT + ["--config.batch_size=12"],
     "batch_size=12 is not divisible by the mesh's 2x4 devices; use a multiple of 8"),
    (PRETRAIN, PT + ["--config.mesh.data=16", "--config.mesh.fsdp=1"],
     "mesh 16x1 does not fit 8 devices; choose mesh.data * mesh.fsdp = 8"),
    (PRETRAIN, PT + ["--config.mesh.data=3", "--config.mesh.fsdp=1"], "does not fit 8 devices"),
    (PRETRAIN, PT + ["--config.mesh.data=-1", "--config.mesh.fsdp=-1"], "cannot both be -1"),
    (PRETRAIN, PT + ["--config.model.name=mae_vit_nope"], "Unknown model 'mae_vit_nope'"),
    (PRETRAIN, PT + ["--config.model.dtype=float8"], "config.model.dtype='float8'; choose one of"),
    (PRETRAIN, PT + ["--config.grad_accum_steps=3"], "grad_accum_steps=3 must give a micro-batch"),
    (PRETRAIN, PT + ["--config.base_lr=0"], "config.base_lr must be > 0"),
    (PRETRAIN, PT + ["--config.log_every_steps=0"], "config.log_every_steps must be positive"),
    (FINETUNE, FT + ["--config.batch_size=60"],
     "batch_size=60 is not divisible by the mesh's 8x1 devices; use a multiple of 8"),
    (FINETUNE, FT + ["--config.data.image_size=30"],
     "image_size=30 is not divisible by the patch size 4 of config.model.name=vit_test_patch4"),
    (FINETUNE, FT + ["--config.init=/nonexistent/encoder"], "config.init=/nonexistent/encoder does "
     "not exist"),
    (FINETUNE, FT + ["--config.model.name=vit_nope"], "config.model: Unknown classifier 'vit_nope'"),
    # The checks every task shares.
    (FINETUNE, FT + ["--config.max_consecutive_nonfinite=0"],
     "config.max_consecutive_nonfinite must be positive"),
    (LINPROBE, FT + ["--config.base_lr=0"], "config.base_lr must be > 0"),
    (LINPROBE, FT + ["--config.model.dtype=float8"], "config.model.dtype='float8'; choose one of"),
    (FINETUNE, ["--config.model.name=vit_small_patch4", "--config.mesh.data=8",
                "--config.init={pretrained}"],
     "holds a 2-block, 32-wide, patch-4 encoder but config.model.name=vit_small_patch4 is"),
])
def test_bad_configs_are_refused_before_compute(variant_file, args, message,
                                                pretrained_elsewhere):
  args = [a.format(pretrained=pretrained_elsewhere) for a in args]
  with pytest.raises((ValueError, AttributeError, FileNotFoundError, flags.Error)) as err:
    config_checks.check(parse(variant_file, args), 1, 8)
  assert message in str(err.value)


# ----------------------------------------------------------------------------------------------
# A pod process dies
def relaunch_matches_the_unbroken_run(workdir, caches, reference, caplog, step):
  """The relaunch of a pod's run (here one process with the same 8 devices: batches and masks do
  not depend on the number of processes) resumes from `step` and ends with the reference's
  losses."""
  with caplog.at_level(logging.INFO):
    trainer.run(run_config(caches), str(workdir))
  assert f"Resumed from the checkpoint at step {step}." in caplog.text
  got, (_, expected) = losses(workdir), reference
  assert sorted(got) == list(range(1, TOTAL + 1))
  np.testing.assert_allclose([got[s] for s in got], [expected[s] for s in got], rtol=2e-5)


def test_a_killed_pod_process_stops_the_other_and_the_relaunch_resumes(reference, caches, tmp_path,
                                                                       caplog):
  workdir = tmp_path / "pod"
  workdir.mkdir()
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  pod_env = dict(os.environ, JAX_PLATFORMS="cpu",
                 XLA_FLAGS="--xla_force_host_platform_device_count=4")
  procs, logs = [], [workdir / f"process_{i}.log" for i in range(2)]
  for i in range(2):
    with open(logs[i], "w") as log:
      procs.append(subprocess.Popen(
          command(workdir, caches) + [
              f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
              f"--process_id={i}", "--heartbeat_timeout_seconds=10"],
          cwd=REPO, env=pod_env, stdout=log, stderr=subprocess.STDOUT))
  try:
    wait_for_step(workdir, 5, procs[0], timeout=400)
    procs[1].kill()
    killed_at = time.time()
    returncode = procs[0].wait(timeout=120)   # no silent hang
    seconds = time.time() - killed_at
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  text = logs[0].read_text()
  assert returncode != 0 and seconds < 60, (returncode, seconds, text[-3000:])
  assert "Terminating process because the JAX distributed service detected fatal errors" in text
  assert "The following tasks are unhealthy (stopped sending heartbeats)" in text
  complete = steps_in(workdir / "checkpoints")
  relaunch_matches_the_unbroken_run(workdir, caches, reference, caplog, max(complete))
  print(f"process 1 of 2 killed after step {max(complete)} was saved: process 0 exited with "
        f"status {returncode} after {seconds:.1f} s (heartbeat timeout 10 s); the relaunch "
        f"resumed from step {max(complete)}")


# ----------------------------------------------------------------------------------------------
# One process of a pod preempted (SIGTERM to local.sh and both processes at once, a VM shutdown,
# is in test_gcs_faults.py, with the pod's workdir on gs://).
def preempted_pod(workdir, caches, target, moment, first_step):
  """The 2-process pod of RUN, SIGTERMed at `moment`; asserts what every preemption must give
  (the same step saved by both, no earlier than `first_step`) and returns that step."""
  result = pod_preemption.preempt(command(workdir, caches)[3:], str(workdir), target, moment,
                                     launcher=os.path.join(REPO, "launch", "local.sh"))
  logs = "".join((workdir / "logs" / f"process_{i}.log").read_text(errors="replace")[-1500:]
                 for i in range(2))
  # Exit 0: every process ended by itself, before local.sh's SIGKILL.
  assert result["rc"] == 0 and result["seconds"] < pod_preemption.GRACE_S, (result, logs)
  saved = set(result["saved"].values())
  assert len(result["saved"]) == 2 and len(saved) == 1 and None not in saved, (result, logs)
  [step] = saved
  assert first_step <= step < TOTAL and max(result["checkpoints"]) == step
  assert result["logged"] == step and result["lost"] == 0   # the last step logged is the one saved
  assert not result["left_behind"]
  print(f"SIGTERM to {target} {result['moment']}: both processes saved step {step}; local.sh "
        f"exited 0 {result['seconds']:.1f} s after the signal")
  return step


def test_sigterm_to_one_process_of_a_resuming_pod_stops_all_at_its_first_step(
    reference, caches, tmp_path):
  """Also before the first step of a resumed run (restore, compilation): the point all agree on
  is still ahead of them."""
  workdir = tmp_path / "pod"
  for step in (2, 4, 6, 8):
    shutil.copytree(os.path.join(reference[0], "checkpoints", str(step)),
                    workdir / "checkpoints" / str(step))
  preempted_pod(workdir, caches, "one", pod_preemption.once_resumed, first_step=9)
