"""What both ends of a KV transfer share: one process's UCX worker and what travels over it that is not pages.

`TransferContext` owns the UCX context and the page memory allocated in it. `Link` owns the UCX worker on
that context: its endpoints (one per peer address), the control channel (typed frames on `CONTROL_TAG`,
see `messages`), the buffers of sends in flight, and where each side reports: `TransferMetrics` and the
`Completion` list. The sending and receiving sides (`sender`, `receiver`) keep their transfers' state;
the link keeps none of it.

A tagged transfer's pages travel as a few large messages (`message_sizes`: at most `MAX_MESSAGES`, each of
at least `MIN_MESSAGE_BYTES` unless the whole transfer is smaller), however many pages it has and however
scattered they are: per-message costs, not bytes, bound small pages' bandwidth (above all on TCP, and for
UCX's GPU transports). A message whose pages are consecutive in the page tensor is sent from or received
into them in place; otherwise its pages are gathered into a staging buffer first (sender) or scattered out
of one after the transfer (receiver): one copy each, on the pages' device.

Tags: `xid << 20 | i + 1` for message i of transfer `xid` (numbered by the receiver, never reused),
`xid << 20` for its `Done`, and `CONTROL_TAG` for handshakes, offers and cancels.

Pages that did not fully arrive are never used: the sender's `Done` (or `Offer`) carries the transfer's byte
count and a digest of its pages (`page_digest`: the first and last bytes of every page's every layer, where a
message that stopped short or landed in the wrong place shows), and the receiver checks both once the pages are
in place; a mismatch fails the transfer (`TransferMetrics.checksum_failures`). `FaultInjector` damages received
pages on purpose, for tests (`SPLITSERVE_KV_FAULT`).
"""

from __future__ import annotations

import enum
import hashlib
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

from splitserve.kv_transfer.messages import (
    MAX_CONTROL_BYTES,
    CompatKey,
    Control,
    ProtocolError,
    decode_control,
    frame,
)
from splitserve.kv_transfer.shared_memory import SharedPageMemory, describe_device

# ucxx sets a variable that UCX 1.21 does not know; UCX would print a warning on stdout for it.
os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
# TCP moves 1 MiB segments instead of 8 KiB ones: 4-5 GB/s on loopback instead of about 1.
os.environ.setdefault("UCX_TCP_TX_SEG_SIZE", "1M")
os.environ.setdefault("UCX_TCP_RX_SEG_SIZE", "1M")

# The UCX bindings, for `receiver` and `sender` too: imported after the environment above is set.
try:
    import ucxx._lib.libucxx as ucx
    from ucxx._lib.arr import Array
except ImportError as e:
    raise ImportError(
        "KV page transfer needs UCX: pip install 'splitserve[cu12]' (CPU-only machines and CUDA 12) or "
        "'splitserve[cu13]' (CUDA 13); scripts/setup.sh picks the one matching this machine"
    ) from e

log = logging.getLogger(__name__)

_INDEX_BITS = 20
MAX_PAGES_PER_TRANSFER = (1 << _INDEX_BITS) - 1
CONTROL_TAG = 1 << 63
# The final `Done` frame, with the sender's payload (e.g. the first sampled token), fits in this.
MAX_DONE_BYTES = 16 * 1024
# How long tags of a transfer that ended early are watched for late messages (see `receiver`, `sender`).
ZOMBIE_GRACE_S = 60.0
# A transfer's pages travel in at most this many messages (several in flight pipeline better, on TCP above
# all), each of at least this many bytes unless the transfer is smaller (`message_sizes`).
MAX_MESSAGES = int(os.environ.get("SPLITSERVE_KV_MAX_MESSAGES", 8))
MIN_MESSAGE_BYTES = int(os.environ.get("SPLITSERVE_KV_MIN_MESSAGE_BYTES", 4 << 20))
# `page_digest` reads this many bytes at each end of every page's every layer: the K of its first token and
# the V of its last slot, a few hundred bytes per page where the page holds tens or hundreds of kilobytes.
DIGEST_EDGE_BYTES = 16


class TransferError(RuntimeError):
    """A transfer that cannot start (bad arguments, incompatible peer)."""


class IncompatiblePeerError(TransferError):
    pass


class Side(enum.Enum):
    """Which end of a transfer a `Completion` is from."""

    SEND = "send"
    RECV = "recv"


@dataclass(frozen=True)
class Completion:
    """The end of one transfer, as its side saw it. Only now may that side's pages be reused."""

    side: Side
    receiver_id: str
    xid: int
    ok: bool
    error: str = ""
    payload: bytes = b""  # the sender's `payload`, delivered with the pages (receiving side, ok only)


@dataclass
class TransferMetrics:
    bytes_sent: int = 0
    bytes_received: int = 0
    transfers_sent: int = 0
    transfers_received: int = 0
    transfers_pulled: int = 0  # of those received, copied out of the sender's shared memory
    messages_sent: int = 0  # tagged messages of pages (a few per transfer, none for pulled ones)
    messages_streamed: int = 0  # of those, sent before their transfer was complete (its prompt still prefilling)
    failures: int = 0
    checksum_failures: int = 0  # received transfers whose bytes or digest did not match the sender's
    orphaned_receives: int = 0
    malformed_messages: int = 0  # control frames dropped as undecodable
    seconds_sending: float = 0.0
    seconds_receiving: float = 0.0


def page_tag(xid: int, index: int) -> ucx.UCXXTag:
    return ucx.UCXXTag(page_tag_value(xid, index + 1))


def page_tag_value(xid: int, index: int) -> int:
    """The tag's value of message `index` of transfer `xid`: 0 its `Done`, i + 1 its run i."""
    return (xid << _INDEX_BITS) | index


def done_tag(xid: int) -> ucx.UCXXTag:
    return ucx.UCXXTag(page_tag_value(xid, 0))


def message_sizes(num_pages: int, page_bytes: int) -> list[int]:
    """How a transfer of `num_pages` pages splits into messages, as page counts in order: at most
    `MAX_MESSAGES`, each of at least `MIN_MESSAGE_BYTES` unless the whole transfer is smaller."""
    count = max(1, min(MAX_MESSAGES, num_pages * page_bytes // MIN_MESSAGE_BYTES, num_pages))
    per = -(-num_pages // count)
    return [min(per, num_pages - start) for start in range(0, num_pages, per)]


def page_digest(pages: torch.Tensor, ids: list[int], num_layers: int) -> bytes:
    """A cheap checksum of pages `ids` of `pages` (`[num_pages, page_bytes]` bytes, on any device): a hash of
    the first and last `DIGEST_EDGE_BYTES` of each page's every layer, in order. A message that stopped short
    leaves the ends of its last pages unwritten, and a page written to the wrong place moves its ends: both
    change it. (Flipped bits inside a page are the transports' to catch: UCX's TCP and shared memory do not
    flip them.) One small gather and one copy to the host."""
    layers = pages.view(pages.shape[0], num_layers, -1)
    edge = min(DIGEST_EDGE_BYTES, layers.shape[-1] // 2)
    index = torch.tensor(ids, device=pages.device)
    edges = torch.cat((layers[index, :, :edge], layers[index, :, -edge:]), dim=-1)
    return hashlib.blake2b(edges.cpu().numpy().tobytes(), digest_size=16).digest()


class FaultInjector:
    """A test hook: `SPLITSERVE_KV_FAULT=truncate` (or `corrupt`, optionally `:N` for the first N, default 1)
    damages the first transfers this process receives, once their pages are in place and before they are
    checked: `truncate` zeroes the last page (the end of the transfer never arrived), `corrupt` flips the first
    byte of the first page. Unset: nothing is damaged."""

    KINDS = ("truncate", "corrupt")

    def __init__(self, spec: str | None):
        kind, _, count = (spec or "").partition(":")
        if kind and kind not in self.KINDS:
            raise ValueError(f"SPLITSERVE_KV_FAULT: {kind!r} is not one of {', '.join(self.KINDS)}")
        self.kind, self.remaining = kind, (int(count) if count else 1) if kind else 0

    def damage(self, pages: torch.Tensor, ids: list[int]) -> None:
        if not self.remaining:
            return
        self.remaining -= 1
        log.warning("SPLITSERVE_KV_FAULT: damaging a received transfer (%s)", self.kind)
        if self.kind == "truncate":
            pages[ids[-1]] = 0
        else:
            pages[ids[0], 0] ^= 0xFF


def copies_done(pages: torch.Tensor) -> None:
    """Wait for the page copies queued on the pages' device (GPU kernels run asynchronously; UCX reads and writes
    buffers without regard to torch's stream): before a staged buffer is sent, or reused after a scatter."""
    if pages.is_cuda:
        torch.cuda.current_stream(pages.device).synchronize()


def page_region(pages: torch.Tensor, ids: list[int]) -> torch.Tensor | None:
    """Rows `ids` of `pages` as one view when they are consecutive (a message sent from or received into
    them in place), else None (the message goes through a staging buffer)."""
    if ids == list(range(ids[0], ids[0] + len(ids))):
        return pages[ids[0] : ids[0] + len(ids)]
    return None


class StagingBuffers:
    """Staging buffers for messages whose pages are not consecutive, kept for reuse: a fresh buffer would
    cost a page fault per 4 KiB on every transfer (the CPU) or an allocation (a GPU). Sized in powers of two
    of pages; at most `keep_bytes` of them wait for reuse."""

    def __init__(self, pages: torch.Tensor, keep_bytes: int = 512 << 20):
        self._pages = pages
        self._keep_bytes = keep_bytes
        self._free: dict[int, list[torch.Tensor]] = {}  # by page count
        self._lent: dict[int, torch.Tensor] = {}  # data pointer -> the buffer a view was taken of

    def take(self, num_pages: int) -> torch.Tensor:
        """A `[num_pages, page_bytes]` buffer on the pages' device (contents undefined)."""
        size = 1 << (num_pages - 1).bit_length()
        free = self._free.get(size)
        buffer = free.pop() if free else self._new((size, self._pages.shape[1]))
        self._lent[buffer.data_ptr()] = buffer
        return buffer[:num_pages]

    def _new(self, shape: tuple[int, int]) -> torch.Tensor:
        if self._pages.is_cuda:
            return self._pages.new_empty(shape)
        # numpy asks the kernel for huge pages for large arrays (torch does not): 4x faster to touch first.
        return torch.from_numpy(np.empty(shape, dtype=np.uint8))

    def give(self, view: torch.Tensor) -> None:
        """Hand back a buffer from `take` once nothing reads or writes it any more."""
        buffer = self._lent.pop(view.data_ptr())
        kept = sum(b.nbytes for free in self._free.values() for b in free)
        if kept + buffer.nbytes <= self._keep_bytes:
            self._free.setdefault(buffer.shape[0], []).append(buffer)


class TransferContext:
    """A process's UCX context and the page memory allocated in it. Allocate the page tensor here
    (`context.memory.zeros`) before creating the agent, so that receivers on this host can map it. The
    agent created with it owns it: closing the agent closes the context."""

    def __init__(self, progress_thread: bool = False):
        """`progress_thread`: UCX progresses transfers in a native thread that sleeps until the network
        wakes it (no polling), so pages keep flowing while the owner is busy in a long forward pass; without
        it, transfers move only when the owner calls `poll()`."""
        features = (ucx.Feature.TAG, ucx.Feature.WAKEUP) if progress_thread else (ucx.Feature.TAG,)
        self.ucx = ucx.UCXContext(feature_flags=features)
        self.progress_thread = progress_thread
        self.memory = SharedPageMemory(self.ucx.handle)

    def close(self) -> None:
        """Free the page memory (tensors over it must not be touched afterwards)."""
        self.memory.close()


class Link:
    """One agent's UCX worker, endpoints and control channel, over its page tensor. Not thread-safe."""

    def __init__(self, pages: torch.Tensor, key: CompatKey, agent_id: str, context: TransferContext):
        if not pages.is_contiguous():
            raise ValueError("the page tensor must be contiguous")
        self.key = key
        self.agent_id = agent_id
        self.metrics = TransferMetrics()
        self.pages = pages.view(torch.uint8).view(pages.shape[0], -1)  # one row of bytes per page
        self.page_bytes = self.pages.shape[1]
        self.context = context
        self.shared = context.memory.describe(pages)  # host pages a receiver may map (None: not shareable)
        self.device_pages = describe_device(pages)  # CUDA pages a receiver on this host may open
        self.staging = StagingBuffers(self.pages)
        self.worker = ucx.UCXWorker(context.ucx)
        self._progress_thread = context.progress_thread
        if self._progress_thread:
            self.worker.init_blocking_progress_mode()
            self.worker.start_progress_thread(polling_mode=False)
        self.address: bytes = self.worker.address.tobytes()
        self._endpoints: dict[bytes, ucx.UCXEndpoint] = {}
        self._sends: list[tuple[object, np.ndarray]] = []  # control and empty sends, with their buffers
        self._completions: list[Completion] = []
        self._control_buffer = np.zeros(MAX_CONTROL_BYTES, dtype=np.uint8)
        self._control_recv = self._post_control_recv()

    def array(self, region: torch.Tensor) -> Array:
        return Array(region if region.is_cuda else region.numpy())

    def endpoint(self, address: bytes) -> ucx.UCXEndpoint:
        ep = self._endpoints.get(address)
        if ep is None:
            # Endpoint error handling off: with it on, UCX silently drops the shared-memory transports.
            ep = ucx.UCXEndpoint.create_from_worker_address(
                self.worker, ucx.UCXAddress.create_from_buffer(address), False
            )
            self._endpoints[address] = ep
        return ep

    def close_endpoint(self, address: bytes) -> None:
        """Close our endpoint to `address`, which cancels what we have in flight to it."""
        ep = self._endpoints.pop(address, None)
        if ep is not None:
            ep.close()

    def send_control(self, address: bytes, message: Control) -> bool:
        """Send a control message (`ProtocolError` when it does not fit one frame). False, logged, when UCX cannot
        reach the peer (a process that died since it gave its address): what waits on it ends by its deadline,
        or at once where the caller knows better (`Sender.send`)."""
        payload = np.frombuffer(frame(message), dtype=np.uint8).copy()
        try:
            endpoint = self.endpoint(address)
        except ucx.UCXError as e:
            log.warning("cannot reach a peer to send it a %s: %s", type(message).__name__, e)
            return False
        self._sends.append((endpoint.tag_send(Array(payload), tag=ucx.UCXXTag(CONTROL_TAG)), payload))
        return True

    def send_empty_to_self(self, tag: ucx.UCXXTag) -> None:
        """Match our own receive posted on `tag` with an empty message (it writes nothing)."""
        empty = np.zeros(0, dtype=np.uint8)
        self._sends.append((self.endpoint(self.address).tag_send(Array(empty), tag=tag), empty))

    def progress(self) -> list[Control]:
        """Progress UCX (unless its thread does) and return the control messages that arrived, in order."""
        if not self._progress_thread:
            self.worker.progress()
        messages = []
        while self._control_recv.completed:
            try:
                self._control_recv.check_error()
                messages.append(decode_control(self._control_buffer.tobytes()))
            except (ProtocolError, ucx.UCXError) as e:
                self.metrics.malformed_messages += 1
                log.warning("dropped a malformed KV-transfer control message: %s", e)
            self._control_buffer[:] = 0
            self._control_recv = self._post_control_recv()
        self._sends = [(r, b) for r, b in self._sends if not r.completed]
        return messages

    def complete(self, completion: Completion) -> None:
        if not completion.ok:
            self.metrics.failures += 1
        self._completions.append(completion)

    def take_completions(self) -> list[Completion]:
        done, self._completions = self._completions, []
        return done

    @property
    def num_sends(self) -> int:
        return len(self._sends)

    def stop(self) -> None:
        """Stop progress and cancel what is in flight (before the sides let go of their memory)."""
        if self._progress_thread:
            self.worker.stop_progress_thread()
        self.worker.cancel_inflight_requests()

    def close(self) -> None:
        """Drop every endpoint and close the context (after `stop`)."""
        self._endpoints.clear()
        self._sends.clear()
        self.context.close()

    def _post_control_recv(self):
        return self.worker.tag_recv(Array(self._control_buffer), tag=ucx.UCXXTag(CONTROL_TAG))
