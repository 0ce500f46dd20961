import os

# Before jax starts: 8 simulated CPU devices for the sharding tests, and no hub access.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# libtpu (the test extra's jax[tpu], for the TPU memory plan) is loaded by every jax process on a
# machine without a TPU too, and by default locks /tmp/libtpu_lockfile for one process at a time.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# Real data and tokenizers, inside the repository (provenance and licenses: assets/README.md).
ASSETS = Path(__file__).resolve().parent / "assets"


@pytest.fixture(scope="session")
def assets() -> Path:
    assert ASSETS.exists(), f"test assets not found at {ASSETS}"
    return ASSETS
