"""What several test modules share: the repository's root, small configs and models, running a
user command, reading a run's losses, random official checkpoints."""
import io
import json
import os
import tarfile
import subprocess
import sys
import textwrap

import jax
import numpy as np
from absl import flags
from PIL import Image

from mae_jax import configs, models
from mae_jax.configs import pretrain as pretrain_config
from mae_jax.interop import convert
from mae_jax.models import pos_embed as pos_embed_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "mae_vit_test_patch4"  # the smallest MAE: 2 blocks of 64 wide, patch 4
# A run for pods of 2 processes of 4 CPU devices (8 in all, a (2, 4) mesh): 16 steps, a
# checkpoint every 2 (conftest.unbroken_pod_run trains it in one process).
POD_RUN = {"model.name": MODEL, "batch_size": 32, "total_steps": 16, "warmup_steps": 4,
           "base_lr": 0.002, "log_every_steps": 1, "checkpoint_every_steps": 2,
           "keep_checkpoints": 10, "figure_every_steps": 0, "eval_every_steps": 0,
           "mesh.data": 2, "mesh.fsdp": 4, "peak_flops_per_device": 1e11}


def tiny_config(**overrides):
  c = pretrain_config.get_config("tiny")
  c.model.name = MODEL
  c.batch_size = 32
  c.total_steps = 20
  c.warmup_steps = 4
  c.base_lr = 2e-3
  c.log_every_steps = 1
  c.checkpoint_every_steps = 5
  c.keep_checkpoints = 10
  c.figure_every_steps = 0
  c.eval_every_steps = 0
  c.mesh.data, c.mesh.fsdp = 2, 4
  c.peak_flops_per_device = 1e11  # for MFU only: skips measuring the matmul peak in every run
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def parse(config, args):
  """The config as `mae_jax.main` gets it from its command line (locked: typos fail)."""
  argv = ["main", f"--config={config}", *args]
  values = flags.FlagValues()
  configs.DEFINE_config_file("config", None, "", flag_values=values, sys_argv=argv)
  values(argv)
  return values.config


def losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def assert_losses_of_unbroken_run(workdir, reference, total_steps: int):
  """Every step 1..total_steps logged in `workdir`, with the losses of the unbroken run in
  `reference` (a run stopped and resumed, or laid out otherwise, must not change them)."""
  got, expected = losses(workdir), losses(reference)
  worst = max(abs(got[s] - expected[s]) / abs(expected[s]) for s in got)
  print(f"{len(got)} steps; largest relative loss difference from the unbroken run: {worst:.1e}")
  assert sorted(got) == list(range(1, total_steps + 1))
  np.testing.assert_allclose([got[s] for s in sorted(got)], [expected[s] for s in sorted(got)],
                             rtol=2e-5)


def run_tool(name, *args):
  return subprocess.run([sys.executable, "-m", f"mae_jax.tools.{name}", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=600, check=False)


def init(model, seed=0):
  """Fresh params; jitted, as the eager init compiles op by op and is slow on a small CPU."""
  return jax.jit(lambda key: models.init_params(model, key))(jax.random.key(seed))


def tiny(**overrides):
  return models.create_model(MODEL, **overrides)


def random_official(model, kind="full", seed=0):
  """An official-layout state_dict with random float32 values and the fixed sin-cos tables."""
  rng = np.random.default_rng(seed)
  state = {}
  for key, shape in convert.official_shapes(model, kind).items():
    shape = tuple(10 if s == -1 else s for s in shape)  # classifier heads: 10 classes
    state[key] = rng.standard_normal(shape).astype(np.float32)
  state["pos_embed"] = pos_embed_lib.sincos_2d(model.embed_dim, model.grid_size)[None]
  if kind == "full":
    state["decoder_pos_embed"] = pos_embed_lib.sincos_2d(
        model.decoder_embed_dim, model.grid_size)[None]
  if kind == "classifier":  # fine-tuning trains pos_embed; global pool replaces norm by fc_norm
    state["pos_embed"] = state["pos_embed"] + rng.standard_normal(state["pos_embed"].shape,
                                                                  dtype=np.float32)
    del state["norm.weight"], state["norm.bias"]
  return state


def assert_same_state(found, expected):
  assert sorted(found) == sorted(expected)
  for key in expected:
    assert found[key].dtype == np.float32, key
    np.testing.assert_array_equal(found[key], expected[key], err_msg=key)


# Runs against the local Cloud Storage server (the `local_gcs` fixture of conftest.py).
GCS_BUCKET = "rehearsal"


def gcs_python(gcs, code: str, timeout: int = 300):
  done = gcs.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True,
                 text=True, timeout=timeout)
  assert done.returncode == 0, done.stderr[-4000:]
  return json.loads(done.stdout.strip().splitlines()[-1])


def gcs_pretrain_command(workdir: str, *overrides: str) -> list[str]:
  return [sys.executable, "-m", "mae_jax.main", "--config=configs/pretrain.py:tiny",
          f"--workdir={workdir}", f"--config.model.name={MODEL}", "--config.batch_size=32",
          "--config.total_steps=10", "--config.warmup_steps=4", "--config.base_lr=0.002",
          "--config.log_every_steps=1", "--config.checkpoint_every_steps=5",
          "--config.keep_checkpoints=2", "--config.figure_every_steps=10",
          "--config.eval_every_steps=0", "--config.mesh.data=2", "--config.mesh.fsdp=4",
          "--config.peak_flops_per_device=1e11", *overrides]


def gcs_losses(gcs, name: str) -> dict:
  lines = gcs.read(GCS_BUCKET, name).decode().splitlines()
  return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


# Small made-up images: ImageNet's two tars in the official layout.
SYNSETS = ("n01440764", "n01443537")     # classes 0 and 1 of TFDS's imagenet2012 label list
CORRUPT = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00 truncated: no image data follows"


def jpeg(seed, h=48, w=64, mode=None, fmt="JPEG") -> bytes:
  rng = np.random.default_rng(seed)
  image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
  if mode:
    image = image.convert(mode)
  buf = io.BytesIO()
  image.save(buf, fmt)
  return buf.getvalue()


def _add(tar, name: str, content: bytes):
  info = tarfile.TarInfo(name)
  info.size = len(content)
  tar.addfile(info, io.BytesIO(content))


def write_imagenet_tars(manual_dir) -> None:
  """ILSVRC2012_img_train.tar (a tar of per-synset tars) and ILSVRC2012_img_val.tar (flat JPEGs,
  labelled by TFDS's validation list) with 7 + 4 small images, one of them corrupt."""
  os.makedirs(manual_dir, exist_ok=True)
  with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_train.tar"), "w") as train:
    for c, synset in enumerate(SYNSETS):
      inner = io.BytesIO()
      with tarfile.open(fileobj=inner, mode="w") as t:
        for i in range(3):
          _add(t, f"{synset}_{i}.JPEG", jpeg(10 * c + i, 40 + 5 * i, 60))
        if c == 1:
          _add(t, f"{synset}_9.JPEG", CORRUPT)
      _add(train, f"{synset}.tar", inner.getvalue())
  with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_val.tar"), "w") as val:
    for i in range(1, 5):
      _add(val, f"ILSVRC2012_val_{i:08d}.JPEG", jpeg(50 + i, 50, 40))
