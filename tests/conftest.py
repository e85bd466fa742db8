"""Strict JAX for every test: four simulated CPU devices and no implicit rank promotion, so
shape mistakes and sharding bugs surface on a laptop. The persistent compilation cache is
pointed at a per-session directory so tests never read programs compiled elsewhere."""

import os
import tempfile

os.environ.setdefault("DYNAMICS_CACHE_DIR", tempfile.mkdtemp(prefix="dynamics-test-cache-"))

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_numpy_rank_promotion", "raise")


# `make test` runs two workers with `--dist loadfile`, which hands whole files out in collection
# order: the slowest files go first (roughly, by their seconds on the 2-core machine) so that
# the two workers finish together instead of one running the last long file alone.
SLOW_FIRST = (
    "test_sweeps.py",
    "test_repro_channel_norm.py",
    "test_run_features.py",
    "test_repro_width_patterns.py",
    "test_layer_lists.py",
    "test_repro_image_prior.py",
    "test_repro_norm_matters.py",
    "test_repro_norm_dynamics.py",
    "test_grow.py",
    "test_depth_masking.py",
    "test_repro_orthogonal.py",
    "test_repro_low_rank.py",
    "test_repro_grad_oscillation.py",
    "test_readme.py",
    "test_stacks.py",
    "test_repro_gram_stability.py",
    "test_repro_convex_bn.py",
)


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
