"""TensorBoard events: on an object store written to local files, each uploaded once, closed, at
the upload points; TensorBoard reads the uploaded files as one run. (On gs:// itself, with the
bytes the store received: tests/test_gcs.py.)"""
import logging
import os

import numpy as np
from etils import epath
from tensorboard.backend.event_processing import event_accumulator

from mae_jax.training import tensorboard_writer


def read_run(logdir) -> dict:
  """{tag: [steps]} as TensorBoard's reader loads the directory (or one event file), every event
  kept."""
  run = event_accumulator.EventAccumulator(os.fspath(logdir), size_guidance={
      event_accumulator.TENSORS: 0, event_accumulator.IMAGES: 0})
  run.Reload()
  return {tag: [e.step for e in run.Tensors(tag)] for tag in run.Tags()["tensors"]}


def test_uploads_each_closed_file_once_at_the_upload_points(tmp_path):
  logdir = tmp_path / "bucket" / "tensorboard"
  writer = tensorboard_writer.UploadingWriter(logdir, upload_every_steps=5)
  uploaded = lambda: sorted(os.listdir(logdir)) if logdir.exists() else []
  writer.write_hparams({"lr": 0.1})
  for step in range(1, 5):
    writer.write_scalars(step, {"loss": 1.0 / step})
  assert uploaded() == [] and writer.uploads == 0  # nothing leaves before the upload point
  writer.write_scalars(5, {"steps_per_sec": 3.0})  # clu's ReportProgress, first at a step
  assert len(uploaded()) == 1 and writer.uploads == 1
  # The rest of step 5 goes to the next file, which is uploaded at step 10.
  writer.write_images(5, {"reconstruction": np.zeros((1, 4, 8, 3), np.uint8)})
  writer.write_scalars(5, {"loss": 0.2})
  assert len(uploaded()) == 1
  # Logged every 4 steps, as when the log interval does not divide the checkpoint's: step 12's
  # scalars are past the file's upload point (10) and go to the next file.
  for step in (8, 12):
    writer.write_scalars(step, {"loss": 1.0 / step})
  assert len(uploaded()) == 2
  writer.write_scalars(13, {"loss": 1.0 / 13})
  writer.flush()  # the end of the run
  writer.flush()  # nothing open: nothing uploaded
  files = uploaded()
  assert len(files) == 3 and writer.uploads == 3
  assert writer._local is None  # pylint: disable=protected-access  (the local files removed)
  assert all(".tfevents." in name for name in files)
  assert read_run(logdir) == {"loss": [1, 2, 3, 4, 5, 8, 12, 13], "reconstruction": [5],
                              "steps_per_sec": [5], "_hparams_/session_start_info": [0]}
  # Each file holds the steps up to its upload point; their names sort in that order.
  assert [sorted({s for steps in read_run(logdir / f).values() for s in steps})
          for f in files] == [[0, 1, 2, 3, 4, 5], [5, 8], [12, 13]]  # 0: the hparams


def test_a_failed_upload_keeps_the_file_and_the_next_upload_sends_it(tmp_path, monkeypatch,
                                                                     caplog):
  logdir = tmp_path / "tensorboard"
  writer = tensorboard_writer.UploadingWriter(logdir, upload_every_steps=2)
  real_write = type(epath.Path(logdir)).write_bytes
  failures = []

  def unavailable_once(self, data):
    if not failures:
      failures.append(self)
      raise OSError("503 Service Unavailable")
    return real_write(self, data)

  monkeypatch.setattr(type(epath.Path(logdir)), "write_bytes", unavailable_once)
  with caplog.at_level(logging.ERROR):
    for step in (1, 2):
      writer.write_scalars(step, {"loss": float(step)})
  assert failures and writer.uploads == 0
  local = writer._local  # pylint: disable=protected-access
  [kept] = [os.path.join(d, f) for d, _, fs in os.walk(local) for f in fs]
  assert f"Could not upload TensorBoard events {kept}" in caplog.text
  assert "OSError: 503 Service Unavailable" in caplog.text and "gcloud storage cp" in caplog.text
  writer.write_scalars(3, {"loss": 3.0})
  writer.write_scalars(4, {"loss": 4.0})  # uploads the kept file, then this one
  assert writer.uploads == 2 and not os.path.exists(kept)
  assert read_run(logdir) == {"loss": [1, 2, 3, 4]}


def test_a_local_logdir_gets_one_file_and_other_processes_none(tmp_path):
  writer = tensorboard_writer.create(tmp_path / "tb", is_chief=True, upload_every_steps=1)
  assert not isinstance(writer, tensorboard_writer.UploadingWriter)
  for step in (1, 2, 3):
    writer.write_scalars(step, {"loss": float(step)})
  writer.flush()
  assert len(os.listdir(tmp_path / "tb")) == 1 and read_run(tmp_path / "tb") == {
      "loss": [1, 2, 3]}
  other = tensorboard_writer.create(tmp_path / "other", is_chief=False, upload_every_steps=1)
  other.write_scalars(1, {"loss": 1.0})
  other.flush()
  assert not (tmp_path / "other").exists()
  assert isinstance(tensorboard_writer.create("gs://bucket/tb", True, 5),
                    tensorboard_writer.UploadingWriter)
