"""The zig-zag ring layout: round trip, and the causal work it balances."""

import jax.numpy as jnp
import numpy as np
import pytest

from longrope_jax import attention as attn


def test_zigzag_round_trip_and_balanced_work():
    idx = attn.zigzag_indices(16, 2)
    np.testing.assert_array_equal(idx, [0, 1, 2, 3, 12, 13, 14, 15, 4, 5, 6, 7, 8, 9, 10, 11])
    x = jnp.arange(2 * 32).reshape(2, 32)
    np.testing.assert_array_equal(attn.unzigzag(attn.zigzag(x, 4), 4), x)
    contiguous = attn.causal_blocks_per_device(64, 8, balanced=False, chunk=4)
    balanced = attn.causal_blocks_per_device(64, 8, balanced=True, chunk=4)
    assert contiguous.sum() == balanced.sum()
    assert contiguous.max() / contiguous.min() > 5
    assert balanced.max() / balanced.min() <= 1.2
    assert attn.causal_critical_path(64, 8, True, 4) < attn.causal_critical_path(64, 8, False, 4)
    with pytest.raises(ValueError, match="multiple of 2 x seq shards"):
        attn.zigzag_indices(20, 4)
