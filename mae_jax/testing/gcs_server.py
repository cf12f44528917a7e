"""The server's side of local_gcs.LocalGCS, a process of its own (`python -m
mae_jax.testing.gcs_server ROOT BINARY`): it moves into its namespaces, makes the test CA, starts
fake-gcs-server (BINARY) on ROOT/store and the HTTPS front, prints one line (READY or ERROR and
why), and serves until its stdin closes."""
import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request

from mae_jax import paths
from mae_jax.testing import certificates, gcs_front, namespaces
from mae_jax.testing.local_gcs import FAILED, HOSTS, READY, RehearsalError


def serve(root: str, binary: str) -> int:
  log = open(os.path.join(root, "server.log"), "a", buffering=1)  # pylint: disable=consider-using-with
  tls_dir = os.path.join(root, "tls")
  try:
    tls = certificates.make(tls_dir, HOSTS)
    hosts = os.path.join(tls_dir, "hosts")
    # This machine's own name too: a pod's processes (gloo, JAX's CPU collectives) look it up
    # for their address, and only loopback exists here.
    paths.write_atomically(hosts, "127.0.0.1 localhost\n::1 localhost\n" +
                           "".join(f"127.0.0.1 {h}\n" for h in (*HOSTS, socket.gethostname())))
    # A user's refresh token, as `gcloud auth application-default login` leaves: every client
    # exchanges it at the OAuth host (this front) for an access token, as on a workstation.
    paths.write_atomically(os.path.join(tls_dir, "credentials.json"), json.dumps(
        {"type": "authorized_user", "client_id": "rehearsal", "client_secret": "rehearsal",
         "refresh_token": "rehearsal"}))
    namespaces.enter(hosts, certificates.trusted_bundle(tls_dir, namespaces.SYSTEM_CA_FILES[0]))
    server = subprocess.Popen(
        [binary, "-scheme", "http", "-host", "127.0.0.1", "-port", str(gcs_front.BACKEND_PORT),
         "-backend", "filesystem", "-filesystem-root", os.path.join(root, "store"),
         "-external-url", f"https://{HOSTS[0]}", "-public-host", HOSTS[0]],
        stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    front = gcs_front.TlsFront(tls, os.path.join(root, "store"),
                               os.path.join(root, "faults.json"), log,
                               os.path.join(root, "requests.log"))
    threading.Thread(target=front.serve_forever, daemon=True).start()
    _wait_until_answering(server, os.path.join(tls_dir, "ca.pem"))
  except Exception as err:  # pylint: disable=broad-except
    print(FAILED + str(err).replace("\n", " "), flush=True)
    return 1
  print(READY + json.dumps({"pid": os.getpid()}), flush=True)
  signal.signal(signal.SIGTERM, lambda *_: sys.stdin.close())
  with contextlib.suppress(Exception):
    sys.stdin.read()  # until the caller closes it, or goes
  server.terminate()
  try:
    server.wait(timeout=10)
  except subprocess.TimeoutExpired:
    server.kill()
  return 0


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


if __name__ == "__main__":
  sys.exit(serve(*sys.argv[1:3]))
