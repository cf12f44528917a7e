"""Keeps JAX off the TPU runtime on machines without TPU chips.

With libtpu installed (it is, to compile TPU programs on CPU machines: `mae_jax.tpu.aot`) every
JAX process would otherwise ask libtpu for chips at start-up: seconds, and error lines about
TPU worker hostnames, in every CPU job and test. No jax import here: this runs when `mae_jax` is
imported, before any backend exists.
"""
import glob
import importlib.util
import os
import sys

_GOOGLE_PCI_VENDOR = "0x1ae0"
# Google's PCI functions that are not TPUs: network (gVNIC) and storage (local NVMe) classes.
_NOT_TPU_CLASSES = ("0x01", "0x02")
_GPU_DEVICES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg")


def _read(path: str) -> str:
  try:
    with open(path) as f:
      return f.read().strip()
  except OSError:
    return ""


def may_have_tpu() -> bool:
  """False only when this machine certainly has no TPU chip: no /dev/accel* or /dev/vfio device
  and no Google PCI function other than a network or storage one."""
  if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
    return True
  for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
    device = os.path.dirname(vendor)
    if (_read(vendor) == _GOOGLE_PCI_VENDOR and
        not _read(os.path.join(device, "class")).startswith(_NOT_TPU_CLASSES)):
      return True
  return False


def skip_tpu_probe_without_tpu() -> bool:
  """Sets JAX's platforms to the CPU when libtpu is installed on a machine without TPU chips or
  GPUs and nobody chose platforms (JAX_PLATFORMS). Returns whether it did."""
  if "JAX_PLATFORMS" in os.environ or importlib.util.find_spec("libtpu") is None:
    return False
  if may_have_tpu() or any(os.path.exists(d) for d in _GPU_DEVICES):
    return False
  os.environ["JAX_PLATFORMS"] = "cpu"  # this process's jax and every child process's
  if "jax" in sys.modules:  # imported first: its config has read the environment already
    sys.modules["jax"].config.update("jax_platforms", "cpu")
  return True
