"""The tar reader: members of in-memory shards against the stdlib's tarfile, damage, pax and GNU long names."""

import io
import tarfile

import pytest
from fakes import make_shards
from hypothesis import given
from hypothesis import strategies as st
from webdataset import TarWriter

from mae_timm.data import read_info
from mae_timm.data.tar_reader import DamagedShard, tar_members


@pytest.fixture(scope="module")
def shard_path(tmp_path_factory):
    shards = make_shards(tmp_path_factory.mktemp("fake"))
    return shards / read_info(shards)["splits"]["train"]["filenames"][0]


def stdlib_members(data):
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]


def test_tar_members_match_stdlib(shard_path):
    shard_bytes = shard_path.read_bytes()
    assert list(tar_members(shard_bytes)) == stdlib_members(shard_bytes)


@given(cut=st.integers(0, 10_000), pax=st.booleans())
def test_tar_members_of_truncated_shard_are_a_prefix(shard_path, pax_shard, cut, pax):
    shard_bytes = pax_shard if pax else shard_path.read_bytes()
    members = []
    with pytest.raises(DamagedShard):
        for member in tar_members(shard_bytes[:cut]):
            members.append(member)
    complete = stdlib_members(shard_bytes)
    assert members == complete[: len(members)]


def test_tar_members_detects_bad_header_and_reads_long_names(shard_path):
    shard_bytes = shard_path.read_bytes()
    damaged = bytearray(shard_bytes)
    damaged[1024 + 10] ^= 0xFF  # the name in the second header (the first member, a .cls, fills one block)
    with pytest.raises(DamagedShard, match="checksum"):
        list(tar_members(bytes(damaged)))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("d" * 120 + "/key.cls")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"7"))
    assert list(tar_members(buffer.getvalue())) == [("d" * 120 + "/key.cls", b"7")]


@pytest.fixture(scope="module")
def pax_shard():
    """A shard whose third and fifth samples have pax headers (webdataset's writer: non-ASCII, > 100-byte names)."""
    buffer = io.BytesIO()
    with TarWriter(buffer, encoder=False, mtime=0) as sink:
        for key in ("a0", "a1", "café2", "a3", "b" * 120 + "4", "a5"):
            sink.write({"__key__": key, "cls": key.encode(), "png": b"x" * 600})
    return buffer.getvalue()


def test_tar_members_reads_pax_and_gnu_long_names_mid_shard(pax_shard):
    assert list(tar_members(pax_shard)) == stdlib_members(pax_shard)
    assert len(stdlib_members(pax_shard)) == 12
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name in ("a0.cls", "d" * 120 + ".cls", "a2.cls"):
            info = tarfile.TarInfo(name)
            info.size = 3
            tar.addfile(info, io.BytesIO(name[:3].encode()))
    assert list(tar_members(buffer.getvalue())) == stdlib_members(buffer.getvalue())
