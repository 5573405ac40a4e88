"""The object store client against a real S3 server: bounded reads."""

from __future__ import annotations

import pytest

from services.common.storage import ObjectStore, ObjectTooLargeError


def test_a_bounded_read_refuses_a_larger_object_before_reading_its_body(store: ObjectStore) -> None:
    store.put("uploads/limits/big.bin", b"x" * 10_000)
    assert store.get("uploads/limits/big.bin", max_bytes=10_000) == b"x" * 10_000
    with pytest.raises(ObjectTooLargeError) as info:
        store.get("uploads/limits/big.bin", max_bytes=9_999)
    assert info.value.size == 10_000 and info.value.key == "uploads/limits/big.bin"
    assert info.value.message == "holds 10,000 bytes; at most 9,999"
    # The refused read left its connection usable.
    assert store.get("uploads/limits/big.bin") == b"x" * 10_000
