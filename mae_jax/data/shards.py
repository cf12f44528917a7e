"""The array_record shard files of a prepared TFDS split, checked against its dataset_info.

array_record's reader reports a missing file only when it first reads from it (hours into a
run), and takes a file cut short, or one whose index is damaged, for a file holding no records:
TFDS then hands out empty records for the examples recorded there, which the pipeline would
replace as undecodable images, a silently shorter epoch. So every shard a split reads is opened
before the first step and its record count compared with the one recorded when it was written;
a record that fails array_record's own checksums later on (or comes back empty) is reported with
the same file name and fix.
"""
import bisect
import concurrent.futures
import itertools

from array_record.python import array_record_module
from etils import epath


class DamagedShardError(RuntimeError):
  """A shard file of a prepared dataset is missing, cut short or unreadable."""


class Shards:
  """The shard files (TFDS FileInstructions) of one split, example index -> file and position.

  `what` names the split in messages ("imagenet2012 train in DIR"); `fix` is the sentence that
  says how to repair it."""

  def __init__(self, what: str, file_instructions, fix: str):
    self.what, self.fix = what, fix
    self.files = list(file_instructions)
    self._starts = list(itertools.accumulate([0] + [f.take for f in self.files]))[:-1]

  def check(self, max_threads: int = 32) -> None:
    """Raises DamagedShardError listing every shard that is missing or holds another number of
    records than dataset_info recorded. Opens each file (reads its index, not its records)."""
    recorded = {f.filename: f.examples_in_shard for f in self.files}
    with concurrent.futures.ThreadPoolExecutor(max(1, min(max_threads, len(recorded)))) as pool:
      problems = [p for p in pool.map(_problem, recorded, recorded.values()) if p]
    if problems:
      more = f"\n  ... and {len(problems) - 5} more" if len(problems) > 5 else ""
      raise DamagedShardError(
          f"{len(problems)} of the {len(recorded)} shard files of {self.what} cannot be read as "
          "dataset_info.json describes them:\n  " + "\n  ".join(problems[:5]) + more +
          f"\n{self.fix}")

  def read(self, records, indices) -> list:
    """records.__getitems__(indices), raising DamagedShardError naming the file of a record
    that cannot be read or comes back empty (an example is never empty)."""
    try:
      got = records.__getitems__(indices)
    except Exception as err:  # pylint: disable=broad-except
      raise DamagedShardError(self._unreadable(records, indices, err)) from err
    empty = [i for i, record in zip(indices, got) if not record]
    if empty:
      filename, position = self._locate(empty[0])
      raise DamagedShardError(
          f"{self.what}: record {position} of {filename} came back empty ({len(empty)} of this "
          f"batch's records did): the file is cut short or damaged.\n{self.fix}")
    return got

  def _locate(self, index: int):
    shard = bisect.bisect_right(self._starts, index) - 1
    return self.files[shard].filename, self.files[shard].skip + index - self._starts[shard]

  def _unreadable(self, records, indices, err) -> str:
    """The message for a failed read: the batch is read again one record at a time to find the
    file(s) at fault."""
    bad = {}
    for index in indices:
      try:
        records.__getitems__([index])
      except Exception as one:  # pylint: disable=broad-except
        filename, position = self._locate(index)
        bad.setdefault(filename, (position, one))
    lines = [f"{name} (record {position}: {_text(e)})"
             for name, (position, e) in sorted(bad.items())]
    if not lines:  # it read fine one at a time: name the batch's files
      lines = sorted({self._locate(i)[0] for i in indices})
      lines[0] += f" ({_text(err)})"
    return (f"{self.what}: cannot read the shard file(s)\n  " + "\n  ".join(lines) +
            f"\nThe file is damaged.\n{self.fix}")


def _problem(filename: str, recorded: int) -> str | None:
  if not epath.Path(filename).exists():
    return f"{filename}: missing"
  try:
    reader = array_record_module.ArrayRecordReader(filename)
    count = reader.num_records()
    reader.close()
  except Exception as err:  # pylint: disable=broad-except
    return f"{filename}: unreadable ({_text(err)})"
  if count != recorded:
    return (f"{filename}: {count:,} records, dataset_info.json recorded {recorded:,} (cut short, "
            "damaged, or written by another preparation)")
  return None


def _text(err: Exception) -> str:
  return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
