"""The one check h5py cannot make: the lengths of variable-length attribute values, read raw.

A variable-length value (the strings Keras writes: ``model_config``, ``layer_names``,
``weight_names``, ...) is stored as a heap ID: a 4-byte length, then where the bytes are.
HDF5 allocates and clears that length before it reads a byte, so one corrupt length makes
it take up to 4 GiB.  ``check_vlen_attributes`` reads the attribute messages of an object
header (version 1 and 2 headers, with their continuation chunks) straight from the file and
refuses a length over the limit before h5py reads the attribute.  A header it cannot
follow is left to HDF5's own checks.
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
                kind, length, mflags = chunk[at], struct.unpack_from("<H", chunk, at + 1)[0], chunk[at + 3]
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


def check_vlen_attributes(obj, read, limit):
    """Refuse an attribute of ``obj`` whose variable-length values declare more than ``limit`` bytes.

    ``read(offset, size)`` returns bytes of the HDF5 file (fewer at its end).
    """
    try:
        addr = h5py.h5o.get_info(obj.id).addr
        messages = list(_messages(read, addr))
    except (struct.error, IndexError, ValueError, OSError):
        return  # not a header this module follows: HDF5 checks it
    for data in messages:
        try:
            name, dtype_class, count, raw = _attribute(data)
        except (struct.error, IndexError):
            continue
        if dtype_class != 9:  # not variable-length
            continue
        lengths = [struct.unpack_from("<I", raw, 16 * i)[0] for i in range(min(count, len(raw) // 16))]
        if sum(lengths) > limit:
            raise ModelFormatError(f"attribute {name.decode('utf8', 'replace')!r} of {obj.name} declares "
                                   f"{limits.human(sum(lengths))} of text, over the {limits.human(limit)} allowed")
