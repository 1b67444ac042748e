"""longrope_jax: context-window extension for RoPE language models in JAX/Flax."""

from longrope_jax.platform import quiet_tpu_probe

__version__ = "0.1.0"

quiet_tpu_probe()  # before anything imports jax: a CPU host with libtpu installed stays quiet
