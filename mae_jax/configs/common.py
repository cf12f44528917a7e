"""What every task's config starts from: the fields the trainer (mae_jax.training.trainer) reads
for every task, at the defaults they share; each task's file sets the rest of its recipe."""
import ml_collections


def base_config(task: str, variant: str, variants) -> ml_collections.ConfigDict:
  """The config of `task` before its recipe; `variant` ("" = fashion_mnist) is one of
  `variants`."""
  variant = variant or "fashion_mnist"
  if variant not in variants:
    raise ValueError(f"Unknown {task} variant {variant!r}; choose one of {', '.join(variants)}.")
  c = ml_collections.ConfigDict()
  c.task = task
  c.variant = variant
  c.seed = 0
  c.total_steps = 0               # > 0 overrides num_epochs
  c.warmup_steps = 0              # > 0 overrides warmup_epochs
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                # -1: all devices not used by the other axis
  c.mesh.fsdp = 1
  c.mesh.slices = -1              # the outermost "dcn" axis: -1 = one per TPU slice; on CPU, N
                                  # splits the processes into N slices (data and fsdp per slice)
  c.max_consecutive_nonfinite = 10  # non-finite steps are skipped; this many in a row stop the run
  c.peak_flops_per_device = 0.0   # for MFU; 0 = known accelerator table, else a measured matmul
  c.plan = ""                     # a plan file (scaling --plan_out) or its JSON: the first
                                  # throughput line sets its step time beside the measured one
  c.profile_steps = ()            # START,END: a jax.profiler trace of these steps in workdir/profile
  return c


def add_init_fields(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The pre-trained encoder a fine-tuning or probing run starts from."""
  c.init = ""                   # an exported encoder, a pre-training workdir or an official .pth
  c.init_model = ""             # MAE size of an official .pth given as init
  c.init_allow_unsafe_pickle = False  # True reads an init .pth that can run code: trusted only
  return c
