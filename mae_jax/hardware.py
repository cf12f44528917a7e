"""Cloud TPU slices as data: one row per accelerator type (`v3-128`, `v5litepod-16`, ...).

The one source of truth for the compile tool (topology to compile for, HBM to fit in), the MFU
table (peak FLOP/s per JAX device) and `launch/tpu.sh` (accepted --accelerator-type names,
default runtime). Standard library only, so the launcher can ask it without jax:

  python3 -m mae_jax.hardware                   # the table
  python3 -m mae_jax.hardware runtime v4-64      # one field of one slice: tpu-ubuntu2204-base

Numbers per JAX device: on v2/v3 a device is one TensorCore (two per chip); on v4 and v5p one
chip (its two cores run as one "megacore"); v5e and v6e chips have one core; a TPU7x (Ironwood)
chip is two dies, each a TensorCore with its own HBM, exposed as two devices. Peak dense bf16
FLOP/s and HBM bandwidth are Google's published figures (cloud.google.com/tpu/docs, the
system-architecture and per-generation pages: v5e 197 TFLOP/s, 16 GB, 819 GB/s per chip; v5p
459, 95 GiB, 2765; v6e 918, 32 GB, 1640; TPU7x 2307, 192 GiB, 7380 GB/s, halved here per device).
HBM is what the TPU compiler lets one program use, as its out-of-memory refusals state it
("exceeds available HBM (15.48G)" on v3): a little under the published capacities (v2 8 GiB and
v3 16 GiB per core; v4 32 GiB, v5e 16 GB, v5p 95 GiB, v6e 32 GB, TPU7x 192 GiB per chip), since
the runtime keeps some. Read with libtpu 0.0.42 and again with 0.0.50 (the same to 0.01 GiB;
where they differ, v5p 95.74/95.73 and v6e 31.25/31.24, the smaller is kept); TPU7x with 0.0.50:
a jitted matmul of 160000^2 float32 operands per device on tpu7x:2x2x1 is refused with
"HLO temporaries (190.73G) exceeds available HBM (94.74G)".

ICI, per link and both directions (the step-time model's collectives): Google's per-generation
pages give a chip's bidirectional ICI bandwidth and its ports: v5e 400 GB/s over 4 ports, v6e
800 over 4, v5p 1200 over 6 (3-D torus), TPU7x 1200 over 6; v3 (2e11) and v4 (9e10) per link are
the figures of "How to Scale Your Model" (jax-ml.github.io/scaling-book, "All about TPUs"), which
agree with the pages above for v5e/v5p/v6e to within 10%. Wraparound: v4, v5p and TPU7x slices
have it on every axis that is a multiple of 4 chips ("All 4x4x4 and larger slices have full 3D
torus", v5p page; v4 page); v5e and v6e on the full pod's 16-chip axes; for v3 the model takes
it only on the 32-chip pod axes, so v3-128's 8x8 is priced as a mesh (an assumption). v2 has no
ICI row: the model names its collectives unknown.
"""
import dataclasses
import sys

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Generation:
  name: str                    # as in accelerator types: v3, v4, v5litepod, v5p, v6e, tpu7x
  topology_prefix: str         # libtpu's topology names: "v3:8x8", "v5e:4x4", "tpu7x:2x2x1"
  device_kind: str             # jax.Device.device_kind on that hardware
  chip_config: str             # "default": a device per core; "megacore": a device per chip
  cores_per_chip: int          # the N in an accelerator type "vX-N" counts cores for 2
  devices_per_chip: int
  hbm_bytes_per_device: int    # what the TPU compiler lets a program use (see below)
  peak_flops_per_device: float  # dense bf16
  hbm_bandwidth_per_device: float  # bytes/s
  runtime_version: str         # default TPU VM image for `gcloud ... tpu-vm create`
  chips_per_host: int          # multi-host slices
  shapes: tuple                # chip grid of each slice, smallest first
  # The interconnect, for the step-time model (mae_jax.tpu.step_model): bidirectional bytes/s
  # of one ICI link of a chip (None: not known, the model names its collectives unknown), and
  # from which length (a multiple of it) a torus axis of the slice has wraparound links.
  ici_link_bandwidth: float | None = None
  torus_wraps_at: int = 0
  # vCPUs of one host of a multi-host slice (the plan's input check; 0: not in the table):
  # Google's TPU VM machine types, v3 96, v4 240, v5e ct5lp-hightpu-4t 112, v5p 208 (v5p page),
  # v6e ct6e-standard-4t 180.
  host_vcpus: int = 0


GENERATIONS = (
    Generation("v2", "v2", "TPU v2", "default", 2, 2, int(7.48 * GIB), 22.5e12, 350e9, "tpu-ubuntu2204-base", 4,
               ((2, 2), (4, 4), (4, 8), (8, 8), (8, 16), (16, 16))),
    Generation("v3", "v3", "TPU v3", "default", 2, 2, int(15.48 * GIB), 61.5e12, 450e9, "tpu-ubuntu2204-base",
               4, ((2, 2), (4, 4), (4, 8), (8, 8), (8, 16), (16, 16), (16, 32), (32, 32)),
               ici_link_bandwidth=2e11, torus_wraps_at=32, host_vcpus=96),
    Generation("v4", "v4", "TPU v4", "megacore", 2, 1, int(30.75 * GIB), 275e12, 1228e9, "tpu-ubuntu2204-base",
               4, ((2, 2, 1), (2, 2, 2), (2, 2, 4), (2, 4, 4), (4, 4, 4), (4, 4, 8), (4, 8, 8),
                   (8, 8, 8), (8, 8, 16), (8, 16, 16)),
               ici_link_bandwidth=9e10, torus_wraps_at=4, host_vcpus=240),
    Generation("v5litepod", "v5e", "TPU v5 lite", "default", 1, 1, int(15.75 * GIB), 197e12, 819e9,
               "v2-alpha-tpuv5-lite", 4,
               ((1, 1), (2, 2), (2, 4), (4, 4), (4, 8), (8, 8), (8, 16), (16, 16)),
               ici_link_bandwidth=1e11, torus_wraps_at=16, host_vcpus=112),
    Generation("v5p", "v5", "TPU v5", "megacore", 2, 1, int(95.73 * GIB), 459e12, 2765e9, "v2-alpha-tpuv5", 4,
               ((2, 2, 1), (2, 2, 2), (2, 2, 4), (2, 4, 4), (4, 4, 4), (4, 4, 8), (4, 8, 8),
                   (8, 8, 8), (8, 8, 16), (8, 16, 16)),
               ici_link_bandwidth=2e11, torus_wraps_at=4, host_vcpus=208),
    Generation("v6e", "v6e", "TPU v6 lite", "default", 1, 1, int(31.24 * GIB), 918e12, 1640e9, "v2-alpha-tpuv6e",
               4, ((1, 1), (2, 2), (2, 4), (4, 4), (4, 8), (8, 8), (8, 16), (16, 16)),
               ici_link_bandwidth=2e11, torus_wraps_at=16, host_vcpus=180),
    # Ironwood. Names as maxtext's accelerator table (tpu7x-N, N TensorCores; libtpu refuses
    # "v7x:"). Runtime: the image Google's TPU VM examples create tpu7x-8 with; the TPU7x page
    # points to GKE first, where the node image is chosen by GKE. Shapes: the power-of-two 3-D
    # ones up to 2048 chips (Google also rents others, 4x4x12 ... up to the 9,216-chip pod).
    Generation("tpu7x", "tpu7x", "TPU7x", "default", 2, 2, int(94.74 * GIB), 2307e12 / 2, 7380e9 / 2,
               "v2-alpha-tpu7-ubuntu2404", 4,
               ((2, 2, 1), (2, 2, 2), (2, 2, 4), (2, 4, 4), (4, 4, 4), (4, 4, 8), (4, 8, 8),
                   (8, 8, 8), (8, 8, 16), (8, 16, 16)),
               ici_link_bandwidth=2e11, torus_wraps_at=4),
)
# Also accepted by gcloud for v5e slices.
ALIASES = {"v5e": "v5litepod"}


@dataclasses.dataclass(frozen=True)
class Slice:
  name: str                    # the accelerator type: v3-128
  generation: Generation
  shape: tuple                 # chip grid
  chips: int
  devices: int
  hosts: int

  @property
  def topology(self) -> str:
    return f"{self.generation.topology_prefix}:{'x'.join(map(str, self.shape))}"

  @property
  def chips_per_host_bounds(self) -> tuple:
    """The per-host chip grid libtpu lays processes out by: (2, 2, 1) on multi-host slices;
    single-host slices of 1 or 8 chips (v5e, v6e) hold the whole grid."""
    if self.hosts == 1:
      return tuple(self.shape) + (1,) * (3 - len(self.shape))
    return (2, 2, 1)

  def row(self) -> dict:
    g = self.generation
    return {"name": self.name, "topology": self.topology, "chip_config": g.chip_config,
            "device_kind": g.device_kind, "chips": self.chips, "devices": self.devices,
            "hosts": self.hosts, "hbm_gib_per_device": g.hbm_bytes_per_device / GIB,
            "peak_tflops_per_device": g.peak_flops_per_device / 1e12,
            "hbm_gbps_per_device": g.hbm_bandwidth_per_device / 1e9,
            "runtime": g.runtime_version}


def _slices() -> dict:
  out = {}
  for g in GENERATIONS:
    for shape in g.shapes:
      chips = 1
      for n in shape:
        chips *= n
      # Single-host machines: up to 8 chips on v5e/v6e (one core each), 4 on the others.
      single_host = chips <= (8 if g.cores_per_chip == 1 else 4)
      name = f"{g.name}-{chips * g.cores_per_chip}"
      out[name] = Slice(name, g, shape, chips, chips * g.devices_per_chip,
                        1 if single_host else chips // g.chips_per_host)
  return out


SLICES = _slices()


def get(name: str) -> Slice:
  """The slice of an accelerator type; an unknown name lists the known ones."""
  prefix, _, size = name.partition("-")
  key = f"{ALIASES.get(prefix, prefix)}-{size}"
  if key not in SLICES:
    raise ValueError(f"unknown TPU accelerator type {name!r}; known: {', '.join(SLICES)}")
  return SLICES[key]


def generation_of_device_kind(device_kind: str) -> Generation | None:
  """The generation whose JAX device_kind `device_kind` is (None when it is no TPU)."""
  for g in GENERATIONS:
    if device_kind == g.device_kind:
      return g
  return None


def _main(argv) -> int:
  if not argv:
    print("| accelerator type | topology | devices | hosts | HBM GiB/device | bf16 TFLOP/s/device |")
    print("|---|---|---|---|---|---|")
    for s in SLICES.values():
      r = s.row()
      print(f"| {r['name']} | {r['topology']} | {r['devices']} | {r['hosts']} | "
            f"{r['hbm_gib_per_device']:g} | {r['peak_tflops_per_device']:g} |")
    return 0
  if len(argv) != 2:
    print("usage: python3 -m mae_jax.hardware [FIELD NAME]", file=sys.stderr)
    return 2
  field, name = argv
  try:
    row = get(name).row()
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  if field not in row:
    print(f"error: unknown field {field!r}; one of {', '.join(row)}", file=sys.stderr)
    return 2
  print(row[field])
  return 0


if __name__ == "__main__":
  sys.exit(_main(sys.argv[1:]))
