"""The HTTPS front of the local Cloud Storage server: it answers on 443 for Google's storage host
names, injects the faults of faults.py, and passes every other request on to fake-gcs-server.

Besides TLS it does what Google's front ends do and fake-gcs-server (Go's net/http) does not: it
accepts "Transfer-Encoding: identity", which TensorFlow's GCS client sends with every empty POST
(Go answers 501), answers the bucket's storage layout, which TensorFlow asks for before it renames
a directory, and hands out the test token at the OAuth host.
"""
import contextlib
import http.client
import http.server
import json
import os
import re
import ssl
import threading
import time
import traceback

from mae_jax.testing import faults
from mae_jax.testing.local_gcs import HOSTS, TOKEN

BACKEND_PORT = 4443  # fake-gcs-server's plain HTTP, inside the namespace only
_TOKEN_PATHS = ("/token", "/oauth2/v3/token", "/oauth2/v4/token")
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te",
               "trailer", "upgrade", "expect", "content-length"}
_HTTP_URL = re.compile(r"^http://(?=(?:%s)(?:[:/]|$))" % "|".join(map(re.escape, HOSTS)))
_STORAGE_LAYOUT = re.compile(r"^/storage/v1/b/([^/]+)/storageLayout$")


class TlsFront(http.server.ThreadingHTTPServer):
  """Serves until shut down; `requests_path` gets one line per request answered: "METHOD
  /path?query STATUS BYTES", STATUS "-" for a dropped connection, BYTES the size of the request's
  body."""
  daemon_threads = True

  def __init__(self, tls: tuple[str, str], store: str, faults_path: str, log, requests_path: str):
    self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    self.tls.load_cert_chain(*tls)
    self.tls.set_alpn_protocols(["http/1.1"])
    self.store, self.log = store, log
    self.faults = faults.Rules(faults_path)
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
    self.log.write(f"front: connection from {client_address}:\n{traceback.format_exc()}")

  def record(self, method: str, path: str, status, body_bytes: int):
    with self._lock:
      self.requests.write(f"{method} {path.replace(' ', '%20')} {status} {body_bytes}\n")


class _Handler(http.server.BaseHTTPRequestHandler):
  protocol_version = "HTTP/1.1"  # keep-alive, and "100 Continue" answered here
  server: TlsFront

  def setup(self):
    super().setup()
    self.backend = http.client.HTTPConnection("127.0.0.1", BACKEND_PORT, timeout=300)

  def finish(self):
    with contextlib.suppress(Exception):
      self.backend.close()
    super().finish()

  def log_message(self, format, *args):  # pylint: disable=redefined-builtin
    pass  # fake-gcs-server logs every request

  def _pass_on(self):
    body = self._read_body()
    self.body_bytes = len(body or b"")
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
    fault = self.server.faults.fault_for(f"{self.command} {self.path}")
    if fault:
      self.server.log.write(f"fault {fault} for {self.command} {self.path}\n")
      time.sleep(fault.get("delay_s", 0))
      if fault.get("drop"):  # as a stopped server: the connection closes with no answer
        self.server.record(self.command, self.path, "-", self.body_bytes)
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
      self.server.record(self.command, self.path, "-", self.body_bytes)
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
    self.server.record(self.command, self.path, status, self.body_bytes)
    self.send_response_only(status)
    for key, value in headers:
      self.send_header(key, value)
    if self.command != "HEAD":
      self.send_header("Content-Length", str(len(data)))
    self.end_headers()
    if self.command != "HEAD":
      self.wfile.write(data)
