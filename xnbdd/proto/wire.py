"""The fixed-size layouts of the NBD wire (proto.md), defined once for the server's handshake and
transmission, the data plane and the client. All are big-endian."""

from __future__ import annotations

import struct

# -- handshake ------------------------------------------------------------------------------------
GREETING_HEAD = struct.Struct("!QQ")  # NBDMAGIC, then CLISERV_MAGIC or IHAVEOPT
NEWSTYLE_GREETING = struct.Struct("!QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
OLDSTYLE_GREETING = struct.Struct("!QQQI124x")  # NBDMAGIC, CLISERV_MAGIC, size, flags, zeros
OLDSTYLE_REST = struct.Struct("!QI124s")  # what follows GREETING_HEAD in the oldstyle greeting
HANDSHAKE_FLAGS = struct.Struct("!H")
CLIENT_FLAGS = struct.Struct("!I")
OPTION_HEADER = struct.Struct("!QII")  # IHAVEOPT, option, data length
OPTION_REPLY = struct.Struct("!QIII")  # magic, option, reply type, data length
EXPORT_NAME_REPLY = struct.Struct("!QH")  # size, transmission flags (then 124 zeros unless not)
INFO_EXPORT = struct.Struct("!HQH")  # type, size, transmission flags
INFO_BLOCK_SIZE = struct.Struct("!HIII")  # type, minimum, preferred, maximum

# -- transmission ---------------------------------------------------------------------------------
REQUEST = struct.Struct("!IHHQQI")  # magic, flags, type, cookie, offset, length
EXTENDED_REQUEST = struct.Struct("!IHHQQQ")  # the same with a 64-bit length
SIMPLE_REPLY = struct.Struct("!IIQ")  # magic, error, cookie
CHUNK = struct.Struct("!IHHQI")  # magic, flags, type, cookie, payload length
EXTENDED_CHUNK = struct.Struct("!IHHQQQ")  # magic, flags, type, cookie, request offset, length
OFFSET_DATA = struct.Struct("!IHHQIQ")  # chunk header + 8-byte offset
EXTENDED_OFFSET_DATA = struct.Struct("!IHHQQQQ")
OFFSET_HOLE = struct.Struct("!QI")  # payload: offset, 32-bit hole size (also when extended)
ERROR_HEAD = struct.Struct("!IH")  # error, message length
EXTENT = struct.Struct("!II")  # length, status
EXTENT_EXT = struct.Struct("!QQ")  # 64-bit length, 64-bit status
BLOCK_STATUS_EXT_HEAD = struct.Struct("!II")  # context id, descriptor count

# -- plain integers -------------------------------------------------------------------------------
U16 = struct.Struct("!H")
U32 = struct.Struct("!I")
U64 = struct.Struct("!Q")
