"""Numerical configuration applied when pydso is imported.

pydso works in float64 by default: the exact tabular reference, finite-difference checks and long-horizon
gradients need it. Importing pydso therefore sets ``jax_enable_x64`` unless the environment variable
``PYDSO_X64=0`` is set before import (then JAX's default float32 is kept; use it for large GPU ensembles).
A persistent compilation cache is enabled when ``PYDSO_CACHE_DIR`` names a directory.

XLA runs one compiled ensemble as one program (it splits only some of its loops over the cores).
``PYDSO_CPU_DEVICES=N`` (set before the first JAX computation)
splits the host CPU into ``N`` JAX devices (``--xla_force_host_platform_device_count``), and pydso shards the
episodes of rollouts and gradient estimates over them (:func:`pydso.engine.shard_episodes`), so ensembles use
``N`` cores. It changes ``jax.devices()`` for the whole process, which is why it is opt-in.
"""

import os

import jax


def configure() -> None:
    cpu_devices = os.environ.get("PYDSO_CPU_DEVICES")
    if cpu_devices:
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_force_host_platform_device_count" not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={int(cpu_devices)}".strip()
    if os.environ.get("PYDSO_X64", "1") != "0":
        jax.config.update("jax_enable_x64", True)
    cache_dir = os.environ.get("PYDSO_CACHE_DIR")
    if cache_dir:
        jax.config.update("jax_compilation_cache_dir", cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
