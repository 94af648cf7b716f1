"""The router <-> worker protocol over ZeroMQ: typed msgspec structs, msgpack on the wire, validated on receipt.

A request's life (docs/design.md), by message:
  router -> decode   `Reserve`      the decode worker takes pages for the prompt and posts UCX receives
  decode -> router   `Reserved`     with the KV-transfer ticket, or a refusal
  router -> prefill  `Prefill`      with that ticket
  prefill -> decode  (over UCX)     the prompt's pages, then a `FirstToken` as the transfer's payload
  prefill -> router  `PrefillDone`  the prefill worker's part is over (ok or failed)
  decode -> router   `Tokens`       every token of every request, batched per decode step (the first one
                                    as soon as the pages landed)
  router -> any      `Abort`        free what the worker holds for the job
  router -> worker   `SwitchRole`   once it holds no work: move to the other pool, keeping its weights and KV
                                    cache; its next heartbeats carry the new role
Colocated workers (role `both`) get `Generate` instead and answer with `Tokens`; so does a decode worker
that holds most of a prompt in its prefix cache (it prefills the rest itself).

A decode worker reserves pages only past the prefix it holds cached, so the prefill worker sends the last
`ticket.num_pages` pages of the prompt. Workers tell the router which pages they cache (`CacheEvents`, by
page hash, see engine/prefix_cache.py) so that it can place a request where its prefix already is.

Workers announce themselves with `Heartbeat`s (who they are, and their load) from a thread of their own,
so a worker busy in a long forward pass still looks alive and a dead one goes quiet. A job id names one
attempt at a request; a retried request gets a new one, so late messages about an old attempt are ignored.
"""

from __future__ import annotations

import enum

import msgspec

from splitserve.engine.params import SamplingParams, TokenLogprob
from splitserve.kv_transfer.messages import CompatKey, Ticket

PROTOCOL_VERSION = 4
MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # a ZMQ frame larger than this is dropped unread


class Role(str, enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"
    BOTH = "both"  # prefill and decode in one process: the colocated baseline


class WorkerInfo(msgspec.Struct, frozen=True):
    worker_id: str
    role: Role
    model: str
    max_model_len: int
    page_size: int
    num_pages: int
    max_num_seqs: int
    kv_key: CompatKey
    pid: int
    host: str
    offload_pages: int = 0  # cached pages its KV offload tier holds at most, beyond the pool's num_pages


class Load(msgspec.Struct, frozen=True):
    free_pages: int
    num_running: int  # decoding (decode, both) or being prefilled (prefill)
    num_waiting: int  # queued, or waiting for their pages to arrive
    pending_prefill_tokens: int  # prompt tokens queued or in progress
    prefill_tokens_per_s: float = 0.0  # its measured prompt throughput (0: not measured yet)
    decode_step_s: float = 0.0  # its measured time of a decode-only step (0: not measured yet)


class CacheStats(msgspec.Struct, frozen=True):
    """A worker's prefix cache: prompt tokens looked up and found, pages evicted, and pages held now."""

    queries: int = 0
    hits: int = 0
    evictions: int = 0
    cached_pages: int = 0
    retained_pages: int = 0  # kept for conversations' next turns
    offloaded_pages: int = 0  # in the offload tier (host memory and disk)
    offload_pages_stored: int = 0
    offload_pages_loaded: int = 0
    offload_bytes_written: int = 0
    offload_bytes_read: int = 0
    offload_seconds_writing: float = 0.0
    offload_seconds_reading: float = 0.0


class KvStats(msgspec.Struct, frozen=True):
    bytes_sent: int = 0
    bytes_received: int = 0
    seconds_sending: float = 0.0
    seconds_receiving: float = 0.0
    failures: int = 0
    transfers_pulled: int = 0  # received by copying the sender's pages out of shared memory (same host)
    checksum_failures: int = 0  # received transfers whose pages did not match the sender's checksum
    messages_streamed: int = 0  # tagged messages sent while their prompt was still being prefilled


class TokenOut(msgspec.Struct, frozen=True, array_like=True):
    job: int
    token_id: int
    finish_reason: str | None = None  # "stop" | "length" when this token ends the job
    logprob: TokenLogprob | None = None


class FirstToken(msgspec.Struct, frozen=True):
    """What the prefill worker hands the decode worker with the pages (the KV transfer's payload)."""

    token_id: int
    logprob: TokenLogprob | None = None
    generator_state: bytes | None = None  # a seeded request's sampler state, so both pools draw one sequence
    version: int = PROTOCOL_VERSION


# --- worker -> router ---------------------------------------------------------------------------------


ACCEPTANCE_BUCKETS = (0.1, 0.25, 0.5, 0.75, 0.9, 1.0)  # a finished request's share of drafted tokens accepted


class SpeculationStats(msgspec.Struct, frozen=True):
    """A decode worker's speculative decoding (--speculative): tokens drafted and accepted, request-steps that
    verified a draft, and finished requests counted by their share of drafted tokens accepted (one count per
    bucket of ACCEPTANCE_BUCKETS, each up to its bound)."""

    method: str = "off"
    drafted: int = 0
    accepted: int = 0
    verify_steps: int = 0
    acceptance: list[int] = []


class Heartbeat(msgspec.Struct, tag=True, frozen=True):
    info: WorkerInfo
    load: Load
    kv: KvStats
    loop_age_s: float  # seconds since the worker's loop last went round: a stuck worker shows here
    cache: CacheStats = CacheStats()
    speculation: SpeculationStats = SpeculationStats()
    version: int = PROTOCOL_VERSION


class CacheEvents(msgspec.Struct, tag=True, frozen=True):
    """Page hashes the worker's prefix cache gained and lost since its last `CacheEvents`."""

    stored: list[int]
    removed: list[int]
    version: int = PROTOCOL_VERSION


class Goodbye(msgspec.Struct, tag=True, frozen=True):
    worker_id: str
    version: int = PROTOCOL_VERSION


class Reserved(msgspec.Struct, tag=True, frozen=True):
    job: int
    ticket: Ticket | None  # None: refused, see error
    load: Load
    error: str = ""
    invalid: bool = False  # refused because the request itself is invalid here (the client's 400), not for room
    version: int = PROTOCOL_VERSION


class PrefillDone(msgspec.Struct, tag=True, frozen=True):
    job: int
    ok: bool
    load: Load
    error: str = ""
    retryable: bool = True  # False: the request itself failed (e.g. its sampling); another attempt would too
    invalid: bool = False  # the worker refused the request as invalid (e.g. a schema it cannot follow): a 400
    version: int = PROTOCOL_VERSION


class Tokens(msgspec.Struct, tag=True, frozen=True):
    items: list[TokenOut]
    load: Load
    version: int = PROTOCOL_VERSION


class JobFailed(msgspec.Struct, tag=True, frozen=True):
    """The worker gave the job up; nothing of it is left there. Retryable when no token was produced."""

    job: int
    error: str
    retryable: bool
    invalid: bool = False  # the worker refused the request as invalid (e.g. a schema it cannot follow): a 400
    version: int = PROTOCOL_VERSION


# --- router -> worker ---------------------------------------------------------------------------------


class Reserve(msgspec.Struct, tag=True, frozen=True):
    job: int
    prompt_token_ids: list[int]
    params: SamplingParams
    cache_key: str | None = None  # the conversation: its pages are kept for its next turn
    output_token_ids: list[int] = []  # generated by an earlier attempt (a migrated request resumes after them)
    version: int = PROTOCOL_VERSION


class Prefill(msgspec.Struct, tag=True, frozen=True):
    job: int
    prompt_token_ids: list[int]
    params: SamplingParams
    ticket: Ticket
    cache_key: str | None = None  # the conversation: its pages are kept for its next turn
    output_token_ids: list[int] = []  # generated by an earlier attempt (a migrated request resumes after them)
    version: int = PROTOCOL_VERSION


class Generate(msgspec.Struct, tag=True, frozen=True):
    job: int
    prompt_token_ids: list[int]
    params: SamplingParams
    cache_key: str | None = None  # the conversation: its pages are kept for its next turn
    output_token_ids: list[int] = []  # generated by an earlier attempt (a migrated request resumes after them)
    version: int = PROTOCOL_VERSION


class Abort(msgspec.Struct, tag=True, frozen=True):
    job: int
    version: int = PROTOCOL_VERSION


class SwitchRole(msgspec.Struct, tag=True, frozen=True):
    """Serve as `role` (prefill or decode) from now on; the router sends no work until the switch shows."""

    role: Role
    reason: str
    version: int = PROTOCOL_VERSION


class Refused(msgspec.Struct, tag=True, frozen=True):
    """The router will not take this worker (another model, an incompatible KV layout)."""

    reason: str
    version: int = PROTOCOL_VERSION


ToRouter = Heartbeat | Goodbye | Reserved | PrefillDone | Tokens | JobFailed | CacheEvents
ToWorker = Reserve | Prefill | Generate | Abort | SwitchRole | Refused

_encoder = msgspec.msgpack.Encoder()
_to_router = msgspec.msgpack.Decoder(ToRouter)
_to_worker = msgspec.msgpack.Decoder(ToWorker)
_first_token = msgspec.msgpack.Decoder(FirstToken)


class ProtocolError(ValueError):
    """A frame that is not a valid message of this protocol version."""


def encode(message: ToRouter | ToWorker | FirstToken) -> bytes:
    return _encoder.encode(message)


def decode_to_router(frame: bytes) -> ToRouter:
    return _decode(_to_router, frame)


def decode_to_worker(frame: bytes) -> ToWorker:
    return _decode(_to_worker, frame)


def decode_first_token(frame: bytes) -> FirstToken:
    return _decode(_first_token, frame)


def _decode(decoder: msgspec.msgpack.Decoder, frame: bytes):
    if len(frame) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"a {len(frame)}-byte frame exceeds {MAX_MESSAGE_BYTES}")
    try:
        message = decoder.decode(frame)
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as e:
        # SamplingParams validates itself on construction and raises ValueError subclasses.
        raise ProtocolError(f"malformed message: {e}") from e
    if message.version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {message.version}, expected {PROTOCOL_VERSION}")
    return message
