"""Split an RDB stream into per-key DUMP payloads without decoding the values.

Every value in an RDB is a composition of lengths, strings, doubles and fixed-width
fields, so its byte extent can be found without decoding listpacks, ziplists or intsets.
The value bytes are copied verbatim into a DUMP payload (type byte + value + 2-byte RDB
version + CRC64), which RESTORE accepts on any server of the same or a newer RDB version.

The splitter is incremental: :meth:`RdbSplitter.feed` accepts chunks cut at any byte and
returns the records they complete. A small record cut short is parsed again from its start
once the bytes it needs have arrived; a composite value (hash, stream, ...) is parsed by a
generator that is suspended in place, so a huge value fed in tiny chunks is still parsed
in linear time. Only the current incomplete record and the unconsumed tail stay buffered.

Formats handled (see redis src/rdb.h and valkey src/rdb.h):

* ``REDIS0009``..``REDIS0012`` (Redis 5.0-7.4, Valkey 7.x/8.x write ``REDIS0011``);
  with version 12, value types 22-25 are Redis 7.4 hashes with field TTLs.
* ``VALKEY080``/``VALKEY081`` (Valkey 9.x); there type 22 is Valkey's hash with field
  expiries and opcode 243 is SLOT_IMPORT.

Big values: with ``big_value_bytes`` set, a value whose serialized size exceeds it is not
buffered. The splitter decodes it instead and emits a :class:`BigValueStart`, then
:class:`BigValueChunk` records with its elements as they arrive, then a
:class:`BigValueEnd`; the reader turns them into chunked writes. Decoded: strings (raw
ones streamed as they come, LZF ones expanded incrementally with an 8 KiB window, in
pure Python: ~10x slower than raw), hashes, sets, zsets (types 3/5: scores as exact
text), lists (quicklist nodes are decoded one node at a time) and single-blob encodings
(listpack, ziplist, intset: a blob is held whole once; they only get big with raised
``*-max-listpack-*`` settings). Streams, module values, zipmaps and hashes with field
TTLs stay buffered whole, as does any single element (a 100 MB hash value) in a value.

Anything else raises RdbError naming the byte offset: other versions (Redis 8.2+ and its
new types and opcodes), module type 6 (cannot be delimited), the pre-GA FUNCTION opcode
246, Valkey's path hash (type 23) and forkless-save UPDATE opcode (242), unknown bytes.
Module type 7 values and MODULE_AUX data are carried as opaque bytes.

The package's files, one concern each: ``records`` (what the splitter emits, its errors),
``primitives`` (lengths and strings), ``lzf`` (LZF expansion), ``encodings`` (listpack,
ziplist, intset), ``values`` (element readers and whole-value decoding for write_mode
rewrite), ``splitter`` (the framing of records and the RdbSplitter).
"""

from __future__ import annotations

from .records import (
    BigValueChunk,
    BigValueEnd,
    BigValueStart,
    FunctionRecord,
    KeyRecord,
    RdbError,
    Record,
    StreamGroup,
    StreamMeta,
)
from .splitter import SUPPORTED_VERSIONS, RdbSplitter

__all__ = ["SUPPORTED_VERSIONS", "BigValueChunk", "BigValueEnd", "BigValueStart",
           "FunctionRecord", "KeyRecord", "RdbError", "RdbSplitter", "Record", "StreamGroup",
           "StreamMeta"]
