"""Variable-length attribute values (Keras's strings), read from the raw file rather than by HDF5.

A variable-length value (the strings Keras writes: ``model_config``, ``layer_names``,
``weight_names``, ...) is stored as a heap ID: a 4-byte length, then where the bytes are.
HDF5 allocates and clears that length before it reads a byte, so one corrupt length makes
it take up to 4 GiB.  ``vlen_attribute`` reads the attribute messages of an object
header (version 1 and 2 headers, with their continuation chunks) straight from the file and
refuses a length over the limit, checks the layout of the global heap collections the values
sit in (HDF5 has looped forever and crashed on corrupt ones), and reads the values itself.
A header it cannot follow is left to h5py.
"""
import struct

import h5py

from . import limits
from .errors import ModelFormatError

_MAX_CHUNKS = 64  # continuation chunks followed per object header


def _messages(read, addr):
    """(type, data) of each header message of the object header at ``addr``."""
    head = read(addr, 16)
    pending, version2 = [], head[:4] == b"OHDR"
    if version2:
        flags = head[5]
        at = addr + 6 + (16 if flags & 0x20 else 0) + (4 if flags & 0x10 else 0)
        width = 1 << (flags & 3)
        size = int.from_bytes(read(at, width), "little")
        pending.append((at + width, size, flags))
    elif head[:1] == b"\x01":
        pending.append((addr + 16, struct.unpack_from("<I", head, 8)[0], None))
    for _ in range(_MAX_CHUNKS):
        if not pending:
            return
        start, size, flags = pending.pop()
        chunk = read(start, size)
        at = 0
        while at + 8 <= len(chunk):
            if flags is None:  # version 1: type (2), size (2), flags, 3 reserved
                kind, length = struct.unpack_from("<HH", chunk, at)
                at += 8
            else:  # version 2: type, size (2), flags, [creation order (2)]
                if len(chunk) - at < 4 + 4:  # the gap before the checksum
                    break
                kind, length = chunk[at], struct.unpack_from("<H", chunk, at + 1)[0]  # then the message flags
                at += 4 + (2 if flags & 0x04 else 0)
            data = chunk[at: at + length]
            at += length
            if kind == 0x10 and len(data) >= 16:  # a continuation chunk
                offset, chunk_size = struct.unpack_from("<QQ", data)
                if flags is None:
                    pending.append((offset, chunk_size, None))
                else:  # "OCHK", messages, checksum
                    pending.append((offset + 4, chunk_size - 8, flags))
            elif kind == 0x0C:
                yield data


def _attribute(data):
    """(name, datatype class, element count, raw data) of an attribute message, or None."""
    version = data[0]
    name_size, type_size, space_size = struct.unpack_from("<HHH", data, 2)
    pad = (lambda n: -(-n // 8) * 8) if version == 1 else (lambda n: n)
    at = 8 if version == 1 else 8 + (1 if version == 3 else 0)
    name = data[at: at + name_size].rstrip(b"\0")
    at += pad(name_size)
    dtype_class = data[at] & 0x0F
    at += pad(type_size)
    space = data[at: at + space_size]
    at += pad(space_size)
    rank, count = space[1], 1
    if space[0] == 2 and space[3] == 2:  # a null dataspace
        count = 0
    dims_at = 8 if space[0] == 1 else 4
    for i in range(rank):
        count *= struct.unpack_from("<Q", space, dims_at + 8 * i)[0]
    return name, dtype_class, count, data[at:]


def _collection(read, addr, limit):
    """{index: (size, offset of its data)} of the objects of the global heap collection at ``addr``, checked.

    A collection is "GCOL", version 1, its size, then objects (index, references, size, data
    padded to 8 bytes) that must tile it, the last one possibly the free space (index 0), which
    ends exactly at its end.
    HDF5 trusts this layout (a corrupt object header has made it loop forever).
    """
    head = read(addr, 16)
    if len(head) < 16 or head[:5] != b"GCOL\x01":
        raise ValueError(f"no global heap collection at {addr}")
    size = struct.unpack_from("<Q", head, 8)[0]
    if not 16 <= size <= limit:
        raise ValueError(f"the global heap collection at {addr} declares {size} bytes")
    data = read(addr, size)
    if len(data) != size:
        raise ValueError(f"the global heap collection at {addr} runs past the end of the file")
    objects, at = {}, 16
    while at + 16 <= size:
        index, _, _, length = struct.unpack_from("<HHIQ", data, at)
        if index == 0:  # the free space, exactly to the end
            if at + length != size:
                raise ValueError(f"the free space of the global heap collection at {addr} does not end with it")
            return objects
        end = at + 16 + -(-length // 8) * 8
        if index in objects or end > size:
            raise ValueError(f"object {index} of the global heap collection at {addr} is corrupt")
        objects[index], at = (length, at + 16), end
    return objects  # less than an object header is left: HDF5 writes no free-space object there


def vlen_attribute(obj, read, name, limit):
    """The values (bytes) of the variable-length attribute ``name`` of ``obj``, read from the raw file.

    Returns a list of bytes (one per element), or None when the object header is not one this
    module follows (then h5py reads it).  Raises ModelFormatError when a value declares more
    than ``limit`` bytes in all, or its global heap collection is not laid out as HDF5 expects:
    h5py is never asked to read such a value (HDF5 allocates the declared length first, and
    has looped forever or crashed on a corrupt collection).

    ``read(offset, size)`` returns bytes of the HDF5 file (fewer at its end).
    """
    try:
        messages = list(_messages(read, h5py.h5o.get_info(obj.id).addr))
    except (struct.error, IndexError, ValueError, OSError, OverflowError):
        return None
    wanted = name.encode("utf8")
    for data in messages:
        try:
            found, dtype_class, count, raw = _attribute(data)
        except (struct.error, IndexError):
            continue
        if found != wanted:
            continue
        if dtype_class != 9:
            raise ModelFormatError(f"attribute {name!r} of {obj.name} is not variable-length text")
        heap_ids = [struct.unpack_from("<IQI", raw, 16 * i) for i in range(min(count, len(raw) // 16))]
        total = sum(length for length, _, _ in heap_ids)
        if total > limit:
            raise ModelFormatError(f"attribute {name!r} of {obj.name} declares {limits.human(total)} of text, "
                                   f"over the {limits.human(limit)} allowed")
        try:
            return [_heap_object(read, where, index, length, limit) for length, where, index in heap_ids]
        except (ValueError, struct.error, OSError, OverflowError) as exc:  # an address past 2**63 too
            raise ModelFormatError(f"attribute {name!r} of {obj.name}: {exc}") from None
    return None


def _heap_object(read, addr, index, length, limit):
    """``length`` bytes of object ``index`` of the global heap collection at ``addr``."""
    if not length:
        return b""
    objects = _collection(read, addr, 2 * limit)
    if index not in objects or objects[index][0] < length:
        raise ValueError(f"the global heap collection at {addr} has no object {index} of {length} bytes")
    return read(addr + objects[index][1], length)
