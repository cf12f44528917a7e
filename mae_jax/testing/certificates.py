"""A test certificate authority made for one rehearsal, and the server certificate it signs."""
import contextlib
import os
import subprocess

from mae_jax import paths
from mae_jax.testing.local_gcs import RehearsalError


def make(directory: str, hosts) -> tuple[str, str]:
  """A test CA (directory/ca.pem) and, signed by it, a certificate for `hosts`, localhost and
  127.0.0.1: (certificate file, key file)."""
  os.makedirs(directory, exist_ok=True)
  path = lambda name: os.path.join(directory, name)
  names = ",".join(f"DNS:{h}" for h in hosts) + ",DNS:localhost,IP:127.0.0.1"
  steps = [
      ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-keyout", path("ca.key"),
       "-out", path("ca.pem"), "-subj", "/CN=mae_jax rehearsal test CA",
       "-addext", "basicConstraints=critical,CA:TRUE",
       "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
      ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", path("server.key"), "-out",
       path("server.csr"), "-subj", f"/CN={hosts[0]}"],
      ["x509", "-req", "-days", "2", "-in", path("server.csr"), "-CA", path("ca.pem"), "-CAkey",
       path("ca.key"), "-CAcreateserial", "-out", path("server.pem"), "-extfile",
       path("server.ext")],
  ]
  paths.write_atomically(path("server.ext"), f"subjectAltName={names}\n"
                         "basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n")
  for step in steps:
    done = subprocess.run(["openssl", *step], capture_output=True, text=True, check=False)
    if done.returncode:
      raise RehearsalError(f"openssl {step[0]} failed: {done.stderr.strip().splitlines()[-1:]}")
  return path("server.pem"), path("server.key")


def trusted_bundle(directory: str, system_ca_file: str) -> str:
  """The system's CA certificates and the test CA in one file, for clients that read only the
  system's store (google-cloud-cpp in array_record, which reads ImageNet's shards)."""
  bundle = os.path.join(directory, "system_and_test_ca.pem")
  parts = []
  for path in (system_ca_file, os.path.join(directory, "ca.pem")):
    with contextlib.suppress(FileNotFoundError), open(path) as f:
      parts.append(f.read().rstrip("\n") + "\n")
  paths.write_atomically(bundle, "".join(parts))
  return bundle
