r"""The pre-training step on this machine's accelerator, beside PyTorch's, in one command.

  python -m mae_jax.benchmarks.accelerator                       # ViT-B/16 and ViT-L/16, bf16
  python -m mae_jax.benchmarks.accelerator --variants=tiny --model=mae_vit_test_patch4 \
      --batch_per_device=4 --steps=3 --warmup=1                 # the whole path, tiny, on CPU

For each pre-training config variant (`configs/pretrain.py:VARIANT`: the paper's decoder, bf16
compute over float32 parameters) it measures, each in a fresh process so that one framework's
memory pool never starves the other's:
  - ours: the trainer's compiled step (`pretrain.build_program`, the program `mae_jax.main`
    runs) on synthetic device data; a second row feeds the real input pipeline where TensorFlow
    is installed (the variant's dataset, `--data_dir`), and says why not where it is not;
  - PyTorch: transformers' ViTMAEForPreTraining at the same size and global batch, autocast
    bf16, fused AdamW, SDPA attention, eager and `torch.compile`; the faster of the two is the
    reference (`--torch_modes`).
Every step is timed alone, from dispatch until its outputs are ready (`block_until_ready`, or
`torch.cuda.synchronize`), after `--warmup` untimed steps; the table gives the median and the
spread (min, p10, p90, max) of `--steps` timed steps. MFU is the step's FLOPs (XLA's cost
analysis of our compiled step, used for both frameworks: the same model) per second against the
device's published dense bf16 peak (mae_jax.training.flops); a device without a published peak
(CPUs) gets no MFU, and the output says so. Peak memory: JAX's allocator statistics
(`peak_bytes_in_use`) and torch's `max_memory_allocated` on GPUs; XLA's compiled memory analysis
where the device keeps no statistics. A model that does not fit at the asked batch is tried again
at half the batch, down to one image per device; the row says so.

Prints a markdown table, then one JSON line with every row. The measurements and the rows are
in mae_jax.benchmarks.side_by_side. Nothing here imports TensorFlow unless the real-data row runs.
"""
import json

from absl import app, flags

from mae_jax.benchmarks import side_by_side

flags.DEFINE_list("variants", ["vit_base", "vit_large"], "Pre-training config variants.")
flags.DEFINE_string("model", "", "Named model instead of the variant's (tiny runs on CPU).")
flags.DEFINE_integer("batch_per_device", 64, "Images per device (the paper's: 64 per GPU); "
                     "halved until the step fits.")
flags.DEFINE_integer("steps", 30, "Timed steps (at least 20 for a published number).")
flags.DEFINE_integer("warmup", 5, "Untimed steps after compilation.")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Compute dtype of both steps.")
flags.DEFINE_list("frameworks", ["jax", "torch"], "jax, torch, or both.")
flags.DEFINE_list("torch_modes", ["eager", "compile"], "PyTorch modes tried; the best is kept.")
flags.DEFINE_bool("real_data", True, "Also a row with the real input pipeline (needs TF).")
flags.DEFINE_string("data_dir", "", "TFDS data_dir of the real-data row ('' = the config's).")
flags.DEFINE_integer("timeout_s", 900, "Limit for each measuring process.")
flags.DEFINE_string("out", "", "Also append the JSON line to this file.")
flags.DEFINE_string("child", "", "internal: run one JAX measurement and print it (jax|jax_real).")
FLAGS = flags.FLAGS


def options_from_flags() -> side_by_side.Options:
  return side_by_side.Options(
      model=FLAGS.model, batch_per_device=FLAGS.batch_per_device, steps=FLAGS.steps,
      warmup=FLAGS.warmup, dtype=FLAGS.dtype, frameworks=tuple(FLAGS.frameworks),
      torch_modes=tuple(FLAGS.torch_modes), real_data=FLAGS.real_data, data_dir=FLAGS.data_dir,
      timeout_s=FLAGS.timeout_s)


def main(argv):
  del argv
  if FLAGS.child:  # one measurement of ours, in this fresh process
    try:
      result = side_by_side.measure_ours(
          FLAGS.variants[0], FLAGS.model, FLAGS.batch_per_device, FLAGS.steps, FLAGS.warmup,
          FLAGS.dtype, FLAGS.child == "jax_real", FLAGS.data_dir)
    except Exception as err:  # pylint: disable=broad-except
      result = {"error": f"{type(err).__name__}: {err}"[-4000:]}
    print(json.dumps(result))
    return
  unknown = set(FLAGS.frameworks) - {"jax", "torch"}
  if unknown:
    raise app.UsageError(f"--frameworks: unknown {sorted(unknown)}; use jax, torch or both.")
  unknown = set(FLAGS.torch_modes) - {"eager", "compile"}
  if unknown:
    raise app.UsageError(f"--torch_modes: unknown {sorted(unknown)}; use eager, compile or both.")
  if FLAGS.steps < 1 or FLAGS.warmup < 0 or FLAGS.batch_per_device < 1:
    raise app.UsageError("--steps >= 1, --warmup >= 0 and --batch_per_device >= 1, please.")
  options = options_from_flags()
  rows = [row for variant in FLAGS.variants
          for row in side_by_side.benchmark_variant(variant, options)]
  print(side_by_side.table(rows))
  notes = [r["mfu_source"] for r in rows if r.get("mfu") is None and "mfu_source" in r]
  warnings = side_by_side.device_warnings(rows)
  for note in [*dict.fromkeys(notes), *warnings]:
    print(note)
  print("Step time: each step from dispatch until its outputs are ready, after "
        f"{FLAGS.warmup} untimed steps; {FLAGS.steps} timed steps per row.")
  line = json.dumps({"benchmark": "accelerator", "steps": FLAGS.steps, "warmup": FLAGS.warmup,
                     "rows": rows, "warnings": warnings})
  if FLAGS.out:
    with open(FLAGS.out, "a", encoding="utf-8") as f:
      f.write(line + "\n")
  print(line)


if __name__ == "__main__":
  app.run(main)
