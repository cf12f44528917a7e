"""Device mesh and parameter placement: FSDP by logical-axis rules, data parallel over the rest.

The model only names its parameter axes ("embed", "mlp", ...); these rules decide which mesh axis
each name is split over. Parameters are split over "fsdp" along their "embed" dimension; the batch
is split over every mesh axis, so an (N, 1) mesh is pure data parallelism and (1, N) is full FSDP.
Over several slices (TPU slices joined by the data-center network, DCN) the mesh gets an
outermost "dcn" axis, one entry per slice, data parallel only: a slice holds a whole copy of
the (data, fsdp) mesh, so only the gradient reduction crosses the slower network.
"""
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp")
DCN_AXIS = "dcn"
BATCH_AXES = (DCN_AXIS, "data", "fsdp")  # those of a mesh's axes it has: batch_axes(mesh)

LOGICAL_RULES = (
    ("embed", "fsdp"),
    ("mlp", None),
    ("heads", None),
    ("head_dim", None),
    ("decoder_embed", None),
    ("patch", None),
    ("classes", None),
)


def mesh_shape(data: int, fsdp: int, num_devices: int) -> tuple[int, int]:
  """Resolves -1 (fill with the remaining devices) and checks the mesh uses every device."""
  if data == -1 and fsdp == -1:
    raise ValueError("mesh.data and mesh.fsdp cannot both be -1; set one of them.")
  for name, size in (("mesh.data", data), ("mesh.fsdp", fsdp)):
    if size == 0 or size < -1:
      raise ValueError(f"{name} must be a positive size or -1 (fill), got {size}.")
  known = (data if data > 0 else 1) * (fsdp if fsdp > 0 else 1)
  if num_devices % known:
    raise ValueError(f"mesh {data}x{fsdp} does not fit {num_devices} devices; choose mesh.data * "
                     f"mesh.fsdp = {num_devices} (or -1 on one axis to fill).")
  data = num_devices // known if data == -1 else data
  fsdp = num_devices // known if fsdp == -1 else fsdp
  if data * fsdp != num_devices:
    raise ValueError(f"mesh {data}x{fsdp} = {data * fsdp} devices, but there are {num_devices}; "
                     f"set mesh.data * mesh.fsdp = {num_devices} (or -1 on one axis to fill).")
  return data, fsdp


def make_mesh(data: int, fsdp: int, devices=None, slices: int = -1) -> jax.sharding.Mesh:
  """The (data, fsdp) mesh over `devices`; over several slices (see `device_slices`), the
  (dcn, data, fsdp) mesh whose data and fsdp axes lie within each slice."""
  devices = jax.devices() if devices is None else devices
  groups = device_slices(devices, slices)
  if len(groups) > 1:
    return _multi_slice_mesh(data, fsdp, groups)
  shape = mesh_shape(data, fsdp, len(devices))
  # Auto axes: XLA's partitioner places the FSDP gathers; the model code stays sharding-free.
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)


def check_slices(slices: int, num_processes: int, num_devices: int):
  """`mesh.slices` against the job's size: -1 (one per TPU slice the devices come from) or a
  positive number that divides the processes (a slice is a group of whole hosts)."""
  if slices == 0 or slices < -1:
    raise ValueError(f"mesh.slices must be a positive number of slices or -1 (as many as the TPU "
                     f"slices of the job), got {slices}.")
  if slices > 0 and (num_processes % slices or num_devices % slices):
    raise ValueError(f"mesh.slices={slices} does not divide the job's {num_processes} processes "
                     f"and {num_devices} devices (a slice is a group of whole processes); set "
                     f"--config.mesh.slices to a divisor of {num_processes}, or -1.")


def device_slices(devices, slices: int = -1) -> list:
  """The devices grouped into slices. TPU devices say which slice they are on (`slice_index`),
  and `slices` must then be that number of slices or -1. Other devices (CPU, GPU; a CPU device
  of a multi-process job has a slice_index too, always 0) are grouped by process: `slices` equal
  runs of whole processes, in process order (-1: one slice), so a local pod of processes runs
  the multi-slice code path as TPU slices would."""
  if _on_tpu_slices(devices):
    found = sorted({d.slice_index for d in devices})
    if slices not in (-1, len(found)):
      raise ValueError(f"the devices come from {len(found)} TPU slice(s) but mesh.slices={slices}; "
                       f"set --config.mesh.slices={len(found)} (or -1: one per TPU slice).")
    return [[d for d in devices if d.slice_index == s] for s in found]
  processes = sorted({d.process_index for d in devices})
  check_slices(slices, len(processes), len(devices))
  count = max(slices, 1)
  per_slice = len(processes) // count
  rank = {p: i // per_slice for i, p in enumerate(processes)}
  return [[d for d in devices if rank[d.process_index] == s] for s in range(count)]


def _on_tpu_slices(devices) -> bool:
  return devices[0].platform == "tpu" and hasattr(devices[0], "slice_index")


def _multi_slice_mesh(data: int, fsdp: int, groups: list) -> jax.sharding.Mesh:
  sizes = {len(g) for g in groups}
  if len(sizes) > 1:
    raise ValueError(f"the slices hold different numbers of devices ({sorted(sizes)}); a "
                     "multi-slice mesh needs slices of one size.")
  shape = (1, *mesh_shape(data, fsdp, len(groups[0])))
  devices = [d for g in groups for d in g]
  # As jax.make_mesh does within a slice: v5e slices may split a physical axis.
  split = devices[0].device_kind in ("TPU v5 lite", "TPU v5e")
  if _on_tpu_slices(devices):
    grid = mesh_utils.create_hybrid_device_mesh(shape, (len(groups), 1, 1), devices,
                                                allow_split_physical_axes=split)
  else:  # no slice_index to group by: the same stacking, over the process groups
    grid = np.concatenate([mesh_utils.create_device_mesh(shape, g) for g in groups])
  return jax.sharding.Mesh(grid, (DCN_AXIS, *MESH_AXES), axis_types=(AxisType.Auto,) * 3)


def batch_axes(mesh) -> tuple:
  """The mesh axes the batch dimension is split over, outermost first."""
  return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(batch_axes(mesh)))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def logical_to_mesh(spec: P, shape, mesh) -> P:
  """Maps one parameter's logical axis names to mesh axes; a dimension that does not divide by its
  mesh axis stays replicated (small tables, odd widths)."""
  rules = dict(LOGICAL_RULES)
  out = []
  for name, dim in zip(tuple(spec), shape):
    axis = rules.get(name) if name is not None else None
    if axis is not None and (dim % mesh.shape[axis] or axis in out):
      axis = None
    out.append(axis)
  return P(*out)


def param_shardings(logical_specs, abstract_params, mesh):
  """NamedShardings for a params pytree from its logical specs (see models.logical_axes)."""
  is_spec = lambda x: isinstance(x, P)
  specs = jax.tree_util.tree_map(
      lambda spec, leaf: logical_to_mesh(spec, leaf.shape, mesh), logical_specs, abstract_params,
      is_leaf=is_spec)
  return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs, is_leaf=is_spec)


def state_shardings(abstract_state, param_trees: dict, mesh):
  """Shardings for a whole train state. `param_trees` maps state keys ("params", a frozen
  "encoder", ...) to their parameter shardings; optimizer leaves follow the parameter whose path
  they end with (Adam's mu/.../blocks_0/attn/qkv/kernel); everything else is replicated."""
  flat_params = {}
  for key, tree in param_trees.items():
    for path, s in jax.tree_util.tree_flatten_with_path(tree)[0]:
      flat_params[leaf_key(path)] = s

  def choose(path, leaf):
    top = leaf_key(path[:1])
    if top in param_trees:
      return flat_params[leaf_key(path[1:])]
    for n in range(len(path) - 1, 0, -1):
      key = leaf_key(path[-n:])
      if key in flat_params and np.ndim(leaf) == len(flat_params[key].spec):
        return flat_params[key]
    return replicated(mesh)
  return jax.tree_util.tree_map_with_path(choose, abstract_state)


def sharded_shapes(init_fn, logical_specs: dict, mesh):
  """(abstract state, shardings) of `init_fn() -> state dict` without running it: the parameter
  subtrees named in `logical_specs` (state key -> logical PartitionSpecs) are placed by the
  rules, optimizer state follows them, everything else is replicated."""
  abstract = jax.eval_shape(init_fn)
  trees = {k: param_shardings(specs, abstract[k], mesh) for k, specs in logical_specs.items()}
  return abstract, state_shardings(abstract, trees, mesh)


def create_sharded(init_fn, shardings, mesh):
  """Runs `init_fn() -> state` with each leaf created in place on its shards."""
  with jax.set_mesh(mesh):
    return jax.jit(init_fn, out_shardings=shardings)()


def leaf_key(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
