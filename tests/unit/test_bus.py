"""The Key_Shared routing key: every producer of a device's messages must compute the same one,
in every process and every release (a change needs a drained device-inbox)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from eventdispatch.bus import ORDERING_BUCKETS, ordering_key


def test_the_bucket_of_a_device_is_fixed_across_releases() -> None:
    # crc32 pinned: a different mapping would split a device between two consumers mid-stream
    assert [ordering_key(d) for d in ("dev-1", "dev-000000", "router-7")] == ["b22", "b25", "b26"]


@given(st.text(min_size=1, max_size=200))
def test_every_device_has_one_of_the_buckets(device: str) -> None:
    key = ordering_key(device)
    assert key == ordering_key(device)
    assert key.startswith("b") and 0 <= int(key[1:]) < ORDERING_BUCKETS


def test_buckets_spread_a_fleet_evenly() -> None:
    counts: dict[str, int] = {}
    for i in range(64_000):
        key = ordering_key(f"dev-{i:06d}")
        counts[key] = counts.get(key, 0) + 1
    assert len(counts) == ORDERING_BUCKETS
    assert max(counts.values()) < 1.2 * 64_000 / ORDERING_BUCKETS
