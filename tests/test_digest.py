"""The digest against the independent xxhash definition; verify catching one flipped byte;
volcopy.extents() for files and devices."""

from __future__ import annotations

import numpy as np
import pytest
import xxhash

import volcopy
from conftest import MiB, needs_root_for_loop, read_all, reference_digest, write_layout


@pytest.mark.parametrize("size", [0, 1, 4095, MiB - 1, MiB, MiB + 1, 5 * MiB + 123])
def test_digest_matches_xxhash_definition(size, workdir):
    content = write_layout(workdir / "v.img", size, [(0, size)] if size else [], seed=size)

    assert volcopy.digest(workdir / "v.img") == reference_digest(content)


def test_digest_of_holes_equals_digest_of_written_zeros(workdir):
    with open(workdir / "sparse.img", "wb") as f:
        f.truncate(7 * MiB + 9)
    with open(workdir / "zeros.img", "wb") as f:
        f.write(bytes(7 * MiB + 9))

    assert volcopy.digest(workdir / "sparse.img") == volcopy.digest(workdir / "zeros.img")
    assert volcopy.digest(workdir / "sparse.img") == reference_digest(bytes(7 * MiB + 9))


@pytest.mark.parametrize(
    "extents",
    [[(MiB, 2 * MiB + 10)], [(MiB, MiB)]],  # data to the end; a hole at both ends, the last chunk short
)
def test_chunk_digests_are_canonical_xxh3_128_of_each_chunk(extents, workdir):
    """Also for the chunks of zeros, which the engine records as 16 zero bytes."""
    content = write_layout(workdir / "src.img", 3 * MiB + 10, extents, seed=3)

    result = volcopy.copy(workdir / "src.img", workdir / "dst.img")

    expected = [xxhash.xxh3_128(content[i : i + MiB]).digest() for i in range(0, len(content), MiB)]
    assert result.chunk_digests.shape == (4, 16)
    assert [bytes(row) for row in result.chunk_digests] == expected


def test_digest_of_length_prefix(workdir):
    content = write_layout(workdir / "v.img", 3 * MiB, [(0, 3 * MiB)], seed=4)

    assert volcopy.digest(workdir / "v.img", length=MiB + 5) == reference_digest(content[: MiB + 5])


@pytest.mark.parametrize("offset", [0, 4095, MiB, 3 * MiB + 77, 4 * MiB - 1])
def test_verify_catches_one_flipped_byte(offset, workdir):
    write_layout(workdir / "src.img", 4 * MiB, [(0, 4 * MiB)], seed=5)
    volcopy.copy(workdir / "src.img", workdir / "dst.img")
    volcopy.verify(workdir / "src.img", workdir / "dst.img")
    with open(workdir / "dst.img", "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x01]))

    with pytest.raises(volcopy.VerifyError) as caught:
        volcopy.verify(workdir / "src.img", workdir / "dst.img")
    assert caught.value.offset == offset
    assert str(offset) in str(caught.value)


def test_verify_of_shorter_destination_fails(workdir):
    write_layout(workdir / "src.img", 2 * MiB, [(0, 2 * MiB)], seed=6)
    write_layout(workdir / "dst.img", MiB, [(0, MiB)], seed=6)

    with pytest.raises(volcopy.VerifyError) as caught:
        volcopy.verify(workdir / "src.img", workdir / "dst.img")
    assert caught.value.offset == MiB


def test_extents_of_sparse_file(workdir):
    layout = [(0, 4096), (MiB, 2 * MiB), (5 * MiB, 8192)]
    write_layout(workdir / "v.img", 8 * MiB, layout, seed=7)

    found = volcopy.extents(workdir / "v.img")

    assert found.dtype == np.int64 and found.shape == (3, 2)
    assert found.tolist() == [list(x) for x in layout]


def test_extents_of_file_without_data(workdir):
    with open(workdir / "v.img", "wb") as f:
        f.truncate(3 * MiB)

    assert volcopy.extents(workdir / "v.img").shape == (0, 2)


@needs_root_for_loop
def test_extents_of_block_device_is_one_extent(workdir, loops):
    device = loops.create(4 * MiB)

    assert volcopy.extents(device).tolist() == [[0, 4 * MiB]]


@needs_root_for_loop
def test_digest_of_loop_device_equals_digest_of_its_backing_file(workdir, loops):
    content = write_layout(workdir / "backing.img", 6 * MiB, [(MiB, MiB), (4 * MiB, 512)], seed=8)
    device = loops.attach(workdir / "backing.img")

    assert volcopy.digest(device) == volcopy.digest(workdir / "backing.img") == reference_digest(content)
    assert read_all(device) == content


def test_copy_with_verify_passes_on_a_good_copy(workdir):
    write_layout(workdir / "src.img", 3 * MiB, [(MiB, 5000)], seed=9)

    result = volcopy.copy(workdir / "src.img", workdir / "dst.img", verify=True)

    assert result.verified


def test_copy_with_verify_and_extents_compares_the_extents(workdir):
    content = write_layout(workdir / "src.img", 3 * MiB, [(0, 3 * MiB)], seed=10)

    result = volcopy.copy(workdir / "src.img", workdir / "dst.img", extents=[(4096, 10_000)], verify=True)

    assert result.verified
    assert read_all(workdir / "dst.img")[4096:14096] == content[4096:14096]


def test_a_copy_result_is_a_read_only_value_shown_without_its_chunk_digests(workdir):
    write_layout(workdir / "src.img", 3 * MiB, [(0, 2 * MiB)], seed=5)
    result = volcopy.copy(workdir / "src.img", workdir / "dst.img")

    assert "chunk_digest" not in repr(result) and f"digest={result.digest!r}" in repr(result)
    assert set(result.as_dict()) == set(result.__slots__) - {"chunk_digest_bytes"}
    # compared as values: the chunk digests' buffer (16 MiB per TiB) is not, the volume digest is
    fields = result.as_dict() | {"chunk_digest_bytes": None}
    assert volcopy.CopyResult(**fields) == result and hash(volcopy.CopyResult(**fields)) == hash(result)
    assert volcopy.CopyResult(**(fields | {"bytes_zero": 1})) != result
    with pytest.raises(AttributeError, match="read-only: cannot set size"):
        result.size = 0
