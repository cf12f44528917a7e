"""Moves the calling process into namespaces of its own: a network with only loopback, and a
filesystem view where /etc/hosts and the system's CA files are replaced (Linux only)."""
import ctypes
import fcntl
import os
import socket
import struct

from mae_jax.testing.local_gcs import RehearsalError

# Where libcurl builds (array_record's google-cloud-cpp) look for the system's CA certificates.
SYSTEM_CA_FILES = ("/etc/ssl/certs/ca-certificates.crt", "/etc/ssl/cert.pem")

_MS_BIND, _MS_REC, _MS_PRIVATE = 4096, 16384, 1 << 18  # <sys/mount.h>
_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 1  # <linux/sockios.h>, <net/if.h>
_IFREQ_FLAGS = "16sH14x"  # struct ifreq: the device name, then ifr_flags


def enter(hosts: str, ca_bundle: str) -> None:
  """This process (still single-threaded: unshare refuses otherwise) moves to a new network
  namespace, with only loopback, and a mount namespace where `hosts` is /etc/hosts and
  `ca_bundle` the system's CA files; a non-root user also to a user namespace, as its root."""
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
  _mount_over(hosts, ca_bundle)
  _bring_up_loopback()


def _mount_over(hosts: str, ca_bundle: str) -> None:
  """Private mounts first, so that the binds below stay in this namespace."""
  libc = ctypes.CDLL(None, use_errno=True)
  mounts = [(None, b"/", _MS_REC | _MS_PRIVATE), (hosts.encode(), b"/etc/hosts", _MS_BIND)]
  mounts += [(ca_bundle.encode(), path.encode(), _MS_BIND)
             for path in SYSTEM_CA_FILES if os.path.isfile(path)]
  for source, target, flag in mounts:
    if libc.mount(source, target, None, flag, None):
      raise RehearsalError(f"mount of {target.decode()} failed: "
                           f"{os.strerror(ctypes.get_errno())}")


def _bring_up_loopback() -> None:
  """The loopback device of a new network namespace is down; Python has no call to raise it."""
  with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    request = struct.pack(_IFREQ_FLAGS, b"lo", 0)
    current = struct.unpack(_IFREQ_FLAGS, fcntl.ioctl(s, _SIOCGIFFLAGS, request))[1]
    fcntl.ioctl(s, _SIOCSIFFLAGS, struct.pack(_IFREQ_FLAGS, b"lo", current | _IFF_UP))
