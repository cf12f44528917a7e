"""The run's TensorBoard events, `workdir/tensorboard`: process 0 writes them, every process logs
its scalars.

On a local disk TensorFlow's summary writer appends to one event file as it goes. An object store
(gs://) cannot append: TensorFlow's gs:// file uploads the whole file again at every flush of the
writer (every 10 events or 2 min), quadratic over a run (docs/reliability.md has the measured
bytes). There the events go to a file on the local disk instead, which is closed and uploaded
once, whole, when the run reaches a multiple of `upload_every_steps` (the trainer passes its
checkpoint interval, so the events of a checkpoint's steps are uploaded before it is saved) and at
every flush() (the end of the run, a preemption, an error); the next event opens a new file.
TensorBoard reads all the event files of a directory as one run, in the order of their names.

A kill loses the events written since the newest upload, as it loses metrics.jsonl's lines. An
upload that fails after the store's retries does not stop the run (metrics.jsonl holds the same
scalars): it is logged, with the local file, and tried again at the next upload."""
import logging
import os
import shutil
import socket
import tempfile
import time

from clu import metric_writers
from clu.metric_writers import interface
from etils import epath

from mae_jax import paths


def create(logdir, is_chief: bool, upload_every_steps: int) -> interface.MetricWriter:
  """The trainer's writer: a local event file, or on an object store an UploadingWriter; for the
  other processes a writer that only logs."""
  if not is_chief:
    return metric_writers.create_default_writer(just_logging=True, asynchronous=True)
  if paths.is_remote(logdir):
    return UploadingWriter(logdir, upload_every_steps)
  return metric_writers.create_default_writer(os.fspath(logdir), asynchronous=True)


class UploadingWriter(interface.MetricWriter):
  """Writes events to a local file and uploads each file once, closed (see the module's doc)."""

  def __init__(self, logdir, upload_every_steps: int):
    self.logdir, self.upload_every_steps = epath.Path(logdir), upload_every_steps
    self.uploads = 0        # files uploaded
    self._made_logdir = False
    self._local = None      # local folder of the files not uploaded yet; None when there are none
    self._writer = None     # the writer of the open file; None between files
    self._open = None       # (local folder of the open file, its name in logdir)
    self._upload_at = None  # the step after whose scalars the open file is uploaded
    self._uploaded_at = None  # the previous file's upload point; the next file's is later
    self._closed = []       # (local folder of a closed file, its name in logdir), oldest first
    self._files = 0         # files opened by this writer

  def _before(self, step: int | None):
    """Uploads the open file if `step` is past its upload point; opens a file if none is."""
    if self._writer is not None and step is not None and self._upload_at is not None and (
        step > self._upload_at):
      self.flush()
    if self._writer is None:
      self._local = self._local or tempfile.mkdtemp(prefix="mae_jax_tensorboard_")
      folder = os.path.join(self._local, f"{self._files:06d}")
      # Sorts after every file written before it, by this process (the counter) or by an
      # earlier launch of the run (the time, to the second).
      name = (f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}."
              f"{os.getpid()}.{self._files:06d}.v2")
      self._writer = metric_writers.create_default_writer(folder, asynchronous=True)
      self._open = (folder, name)
      self._files += 1
    if self._upload_at is None and step is not None:
      every = self.upload_every_steps
      # A step's scalars can come in more than one write (clu's ReportProgress writes its own at
      # the last step, before the trainer's): the rest of the step goes to the next file.
      self._upload_at = max(-(-step // every) * every, (self._uploaded_at or 0) + every)

  def write_scalars(self, step, scalars):
    self._before(step)
    self._writer.write_scalars(step, scalars)
    # The trainer writes a step's scalars last, just before it saves that step's checkpoint.
    if step == self._upload_at:
      self.flush()

  def write_summaries(self, step, values, metadata=None):
    self._before(step)
    self._writer.write_summaries(step, values, metadata)

  def write_images(self, step, images):
    self._before(step)
    self._writer.write_images(step, images)

  def write_videos(self, step, videos):
    self._before(step)
    self._writer.write_videos(step, videos)

  def write_audios(self, step, audios, *, sample_rate):
    self._before(step)
    self._writer.write_audios(step, audios, sample_rate=sample_rate)

  def write_texts(self, step, texts):
    self._before(step)
    self._writer.write_texts(step, texts)

  def write_histograms(self, step, arrays, num_buckets=None):
    self._before(step)
    self._writer.write_histograms(step, arrays, num_buckets)

  def write_hparams(self, hparams):
    self._before(None)
    self._writer.write_hparams(hparams)

  def flush(self):
    """Closes the open file and uploads every closed file not uploaded yet, oldest first."""
    if self._writer is not None:
      self._writer.close()  # waits for its asynchronous writes: the file is complete
      self._closed.append(self._open)
      self._uploaded_at = self._upload_at or self._uploaded_at
      self._writer = self._open = self._upload_at = None
    while self._closed:
      folder, name = self._closed[0]
      [events] = os.listdir(folder)  # the one file its writer wrote
      local = os.path.join(folder, events)
      try:
        if not self._made_logdir:
          self.logdir.mkdir(parents=True, exist_ok=True)
          self._made_logdir = True
        with open(local, "rb") as f:
          (self.logdir / name).write_bytes(f.read())
      except Exception as err:  # pylint: disable=broad-except
        logging.error(
            "Could not upload TensorBoard events %s to %s: %s: %s. They stay on this machine; "
            "the next upload tries again (if the run ends before, copy them there yourself: "
            "gcloud storage cp %s %s).", local, self.logdir / name, type(err).__name__,
            str(err).splitlines()[0] if str(err) else "", local, self.logdir / name)
        return
      shutil.rmtree(folder)
      self._closed.pop(0)
      self.uploads += 1
    if self._writer is None and self._local is not None:
      shutil.rmtree(self._local)
      self._local = None

  def close(self):
    self.flush()
