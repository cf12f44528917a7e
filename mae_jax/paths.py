"""Paths that may be local or on an object store (gs://): one test for which, one way to open."""
import os


def is_remote(path) -> bool:
  """True for a URL such as gs://bucket/dir, which only the storage clients can reach."""
  return "://" in os.fspath(path)


def resolve(path):
  """`path` as an etils epath.Path: a URL as it is, a local path made absolute (orbax wants
  that)."""
  from etils import epath  # pylint: disable=import-outside-toplevel  (keeps `import mae_jax` light)
  return epath.Path(path if is_remote(path) else os.path.abspath(path))


def write_atomically(path, text: str) -> None:
  """Writes `text` to a temporary sibling, then renames it over `path`: a kill leaves the old
  file or the new one, whole, never half of it. Local or gs://."""
  path = resolve(path)
  partial = path.parent / (path.name + ".tmp")
  partial.write_text(text)
  partial.replace(path)
