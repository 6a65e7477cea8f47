"""Payload ids name their algorithm (store/content_id.py): new payloads get
BLAKE3 ids, and the SHA-256 ids of earlier versions' data dirs and logs keep
working, each checked against the algorithm its id names."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest

from store import content_id
from store.errors import CorruptData
from store.payloads import PayloadStore


@pytest.fixture
def ids_default() -> Iterator[None]:
    yield
    content_id.choose(content_id.B3)  # the process-wide setting back as Store's default leaves it


def test_ids_name_their_algorithm() -> None:
    data = os.urandom(100_000)
    assert content_id.id_of(data) == "b3-" + blake3.blake3(data).hexdigest()  # the default
    assert content_id.id_of(data, content_id.SHA256) == hashlib.sha256(data).hexdigest()
    assert content_id.kind_of(content_id.id_of(data)) == content_id.B3
    assert content_id.kind_of(hashlib.sha256(data).hexdigest()) == content_id.SHA256
    for bad in ["", "b3-", "b3-" + "0" * 63, "0" * 65, "B3-" + "0" * 64, "b3-" + "g" * 64, "../" + "0" * 61]:
        assert content_id.kind_of(bad) is None, bad


def test_payload_ids_sha256_names_new_payloads_as_earlier_versions_do(ids_default: None) -> None:
    data = b"x" * 1000
    content_id.choose(content_id.SHA256)
    assert content_id.id_of(data) == hashlib.sha256(data).hexdigest()
    with pytest.raises(ValueError, match="md5"):
        content_id.choose("md5")


def test_a_data_dir_of_an_earlier_version_keeps_its_payloads(tmp_path: Path) -> None:
    """Files named by SHA-256 (as earlier versions wrote them) are found,
    verified by SHA-256, and discarded if corrupt; new ones get BLAKE3 names."""
    root = tmp_path / "payloads"
    root.mkdir()
    old, corrupt = os.urandom(50_000), os.urandom(50_000)
    old_id, corrupt_id = hashlib.sha256(old).hexdigest(), hashlib.sha256(corrupt).hexdigest()
    (root / old_id).write_bytes(old)
    (root / corrupt_id).write_bytes(corrupt[:-1] + bytes([corrupt[-1] ^ 1]))
    store = PayloadStore(root)  # a restart on the old data dir
    assert bytes(store.get(old_id) or b"") == old
    assert store.get(corrupt_id) is None and not (root / corrupt_id).exists()
    new = os.urandom(50_000)
    new_id = store.put(new)
    assert new_id == content_id.id_of(new) and new_id.startswith("b3-")
    assert (root / new_id).read_bytes() == new
    store.applied(new_id, 1)  # dropped from memory: read back from disk and verified by BLAKE3
    assert bytes(store.get(new_id) or b"") == new
    (root / new_id).write_bytes(new[:-1] + bytes([new[-1] ^ 1]))
    assert store.get(new_id) is None and not (root / new_id).exists()
    store.put(old, old_id)  # an old-form id given with its bytes is still accepted
    with pytest.raises(CorruptData, match="expected"):
        store.put(new, hashlib.sha256(old).hexdigest())
    with pytest.raises(CorruptData, match="expected"):
        store.put(new, content_id.id_of(old))
