from setuptools import find_packages, setup

setup(
    name="mae_jax",
    version="0.1.0",
    description="Masked Autoencoder (MAE) pre-training of Vision Transformers in JAX/Flax, TPU-first.",
    packages=find_packages(include=["mae_jax", "mae_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10,<0.11",
        "flax>=0.12,<0.13",
        "optax>=0.2.5,<0.3",
        "orbax-checkpoint>=0.12,<0.13",
        "tensorflow-cpu>=2.18,<2.22",
        "tensorflow-datasets>=4.9.8,<5",
        "ml-collections>=1.0,<2",
        "clu>=0.0.12",
        "tensorboard>=2.18,<2.22",
        "numpy>=1.26",
        "pillow>=10",
        "matplotlib>=3.8",
        "safetensors>=0.4",
        "absl-py>=2",
        "etils[epath]>=1.7",
        "importlib_resources",  # imported by tensorflow-datasets, declared there only for old Pythons
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout>=2.3", "pytest-xdist>=3.5"],
        # Reading official .pth checkpoints and the PyTorch parity tests. Install torch as
        # `pip install torch==2.13.0` (the CPU build) before this extra to avoid a CUDA download.
        "torch": ["torch==2.13.0", "transformers>=4.40"],
        # libtpu: runs on TPU VMs, and compiles TPU programs on any machine (mae_jax.tpu.aot).
        # The same range as jax above, so pip picks the libtpu built for the installed jax.
        "tpu": ["jax[tpu]>=0.10,<0.11"],
    },
)
