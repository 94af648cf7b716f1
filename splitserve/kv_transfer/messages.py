"""Typed messages of the KV transfer protocol (msgspec structs, msgpack on the wire, validated on receipt).

Control messages travel as UCX tagged messages on `CONTROL_TAG`, framed with a 4-byte length; a
`Ticket` travels from the decode side to the prefill side through the router.

A transfer moves its pages one of two ways, agreed per pair of agents at the handshake:
- *tagged*: the sender sends the pages as a few large tagged messages into the receives the receiver posted
  for them (see `link`), then a `Done` with the payload (any two hosts, any memory);
- *pulled*: the sender's pages are in shared memory the receiver mapped at the handshake (`SharedPages`,
  same host): the sender sends an `Offer` naming its pages, the receiver copies them into its own and
  answers `Taken`. The sender keeps its pages untouched until `Taken` or the offer's deadline, and the
  receiver keeps a copy only if it finished before that deadline, so a late copy is discarded rather
  than read from reused pages (both sides read the same CLOCK_MONOTONIC: they share a host).
"""

from __future__ import annotations

import struct

import msgspec

PROTOCOL_VERSION = 5
KV_LAYOUT = "page-major:[pages,layers,2,page_size,kv_heads,head_dim]"
MAX_CONTROL_BYTES = 64 * 1024
_FRAME = struct.Struct("<I")


class CompatKey(msgspec.Struct, frozen=True):
    """What must agree for one worker's pages to be valid in another's cache."""

    model: str
    dtype: str
    page_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    layout: str = KV_LAYOUT
    quantization: str = "none"  # weights computing the KV (and continuing from it) must be the same
    kv_dtype: str = ""  # the pages' element type (--kv-dtype; an older peer sends none: it does not match)
    layers_per_page: int = 0  # the layers a page holds when not all of them (engine/kv_layout.py); 0: all
    ring_pages: int = 0  # pages of a sliding-window layer group's ring; 0: none

    @property
    def page_layers(self) -> int:
        return self.layers_per_page or self.num_layers

    def mismatch(self, other: CompatKey) -> str | None:
        """A readable list of the fields that differ, or None when the keys agree."""
        diffs = [
            f"{f}: {getattr(self, f)!r} here, {getattr(other, f)!r} there"
            for f in self.__struct_fields__
            if getattr(self, f) != getattr(other, f)
        ]
        return "; ".join(diffs) or None


class Ticket(msgspec.Struct, frozen=True):
    """What a sender needs to fill a reservation: where to send, the transfer's id there, and how the
    reserved pages split into tagged messages (`link.message_sizes`)."""

    receiver_id: str
    address: bytes  # the receiver's UCX worker address
    xid: int
    message_pages: list[int]  # pages per message, in the reservation's order
    key: CompatKey
    version: int = PROTOCOL_VERSION

    @property
    def num_pages(self) -> int:
        return sum(self.message_pages)


class SharedPages(msgspec.Struct, frozen=True):
    """A sender's page tensor in UCX-allocated shared memory: what a peer on its host needs to map it."""

    rkey: bytes  # UCX's packed remote key
    address: int  # of the first page, in the sender's address space
    nbytes: int


class DevicePages(msgspec.Struct, frozen=True):
    """A sender's page tensor on a CUDA device: the CUDA IPC handle of the allocation holding it (as torch shares
    a CUDA storage between processes), for a peer on the same host, seeing the same devices, to open."""

    host: str  # the kernel's boot id: a handle opens only on its own host
    device: int
    handle: bytes
    storage_bytes: int
    storage_offset: int  # of the storage within the IPC allocation
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes
    event_sync_required: bool
    offset: int  # of the first page within the storage, in bytes
    nbytes: int


class Hello(msgspec.Struct, tag=True, frozen=True):
    """First contact from a sender: who it is, where to answer, its compatibility key, and its pages when
    a receiver on its host may map them (host memory UCX shares, or a CUDA device's through CUDA IPC)."""

    agent_id: str
    address: bytes
    key: CompatKey
    shared: SharedPages | None = None
    device: DevicePages | None = None
    version: int = PROTOCOL_VERSION


class HelloReply(msgspec.Struct, tag=True, frozen=True):
    agent_id: str
    ok: bool
    error: str = ""
    pulls: bool = False  # the receiver mapped the sender's pages: send it `Offer`s, not tagged pages
    version: int = PROTOCOL_VERSION


class Cancel(msgspec.Struct, tag=True, frozen=True):
    """Either side gives up transfer `xid` (numbered by the receiver `receiver_id`)."""

    receiver_id: str
    xid: int
    reason: str
    version: int = PROTOCOL_VERSION


class Offer(msgspec.Struct, tag=True, frozen=True):
    """Sender to a receiver that pulls: `pages` (the sender's, in the reservation's order) are ready to copy
    until `deadline` (CLOCK_MONOTONIC); `payload` comes with them as with `Done`."""

    sender_id: str
    receiver_id: str
    xid: int
    pages: list[int]
    deadline: float
    payload: bytes = b""
    digest: bytes = b""  # `link.page_digest` of the pages, which the copy must match
    version: int = PROTOCOL_VERSION


class Taken(msgspec.Struct, tag=True, frozen=True):
    """Receiver to the sender of an `Offer`: the pages are copied (ok), or will not be; either way the
    sender's pages are free again."""

    receiver_id: str
    xid: int
    ok: bool
    reason: str = ""
    version: int = PROTOCOL_VERSION


class Done(msgspec.Struct, tag=True, frozen=True):
    """The sender's last word on a transfer, sent after every page: ok, or given up."""

    ok: bool
    reason: str = ""
    payload: bytes = b""  # opaque to kv_transfer: what the sender's user hands the receiver's with the pages
    nbytes: int = 0  # the pages' bytes sent, and `link.page_digest` of them: the received pages must match
    digest: bytes = b""
    version: int = PROTOCOL_VERSION


Control = Hello | HelloReply | Cancel | Offer | Taken
_control_decoder = msgspec.msgpack.Decoder(Control)
_done_decoder = msgspec.msgpack.Decoder(Done)
_encoder = msgspec.msgpack.Encoder()


class ProtocolError(ValueError):
    """A message that is malformed or of another protocol version."""


def frame(message: Control | Done, limit: int = MAX_CONTROL_BYTES) -> bytes:
    body = _encoder.encode(message)
    if len(body) + _FRAME.size > limit:
        raise ProtocolError(f"control message of {len(body)} bytes exceeds {limit}")
    return _FRAME.pack(len(body)) + body


def _unframe(buffer: bytes | memoryview) -> memoryview:
    view = memoryview(buffer)
    if len(view) < _FRAME.size:
        raise ProtocolError("truncated frame")
    (length,) = _FRAME.unpack_from(view)
    if length > len(view) - _FRAME.size:
        raise ProtocolError(f"frame says {length} bytes, buffer holds {len(view) - _FRAME.size}")
    return view[_FRAME.size : _FRAME.size + length]


def decode_control(buffer: bytes | memoryview) -> Control:
    return _decode(_control_decoder, buffer)


def decode_done(buffer: bytes | memoryview) -> Done:
    return _decode(_done_decoder, buffer)


def _decode(decoder: msgspec.msgpack.Decoder, buffer: bytes | memoryview):
    """Unframe, decode and validate one message; anything malformed raises ProtocolError."""
    try:
        message = decoder.decode(_unframe(buffer))
    except msgspec.DecodeError as e:
        raise ProtocolError(f"malformed message: {e}") from e
    _check_version(message.version)
    return message


def _check_version(version: int) -> None:
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version}, expected {PROTOCOL_VERSION}")
