"""Test-wide setup: 8 fake CPU devices, so the data-parallel code really splits.

XLA reads the flag once, when jax first initialises its backend, so it is set
here, before any test module imports jax.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
