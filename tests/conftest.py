"""Force 8 CPU devices before jax is imported anywhere in the test session."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=8".strip()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402  (after the flags: nothing may import jax first)


@pytest.fixture(scope="module")
def kjv_dir(tmp_path_factory) -> str:
    """The KJV corpus prepared once per module (or the directory LONGROPE_TEST_DATA_DIR names)."""
    from longrope_jax.data import sources as data

    d = os.environ.get("LONGROPE_TEST_DATA_DIR") or str(tmp_path_factory.mktemp("tfds"))
    data.prepare("kjv", d)
    return d
