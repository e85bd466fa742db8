"""Strict JAX for every test: four simulated CPU devices and no implicit rank promotion, so
shape mistakes and sharding bugs surface on a laptop. The persistent compilation cache is
pointed at a per-session directory so tests never read programs compiled elsewhere."""

import os
import tempfile

os.environ.setdefault("DYNAMICS_CACHE_DIR", tempfile.mkdtemp(prefix="dynamics-test-cache-"))

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_numpy_rank_promotion", "raise")
