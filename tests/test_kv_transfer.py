"""KV page transfer between real processes over UCX (TCP and shared memory): byte-exact pages, many
requests between many peers, handshake refusal, deadlines when a peer dies, and cancels from either side.
Over TCP pages travel as tagged messages; over shared memory the receiver copies them out of the sender's
UCX-mapped memory (an offer), which must fail closed when the offer expires before the copy."""

from __future__ import annotations

import hashlib
import random
import time

import msgspec
import pytest

from splitserve.kv_transfer.messages import CompatKey, DevicePages, Ticket
from splitserve.kv_transfer.testing import Peer, page_shape, random_pages

KEY = CompatKey(model="tiny", dtype="fp16", page_size=4, num_layers=2, num_kv_heads=2, head_dim=16)
BIG_KEY = CompatKey(model="tiny", dtype="fp16", page_size=16, num_layers=16, num_kv_heads=8, head_dim=128)


def _zero_hash(key: CompatKey) -> str:
    n = 2  # fp16
    for d in page_shape(key):
        n *= d
    return hashlib.sha256(bytes(n)).hexdigest()


@pytest.fixture
def peers():
    started: list[Peer] = []

    def start(agent_id: str, *, key=KEY, num_pages=64, transport="tcp", fill_seed=None, env=None) -> Peer:
        # shm-tagged: pages outside UCX's shared memory, sent as tagged messages through its shm transports
        pulls = transport != "shm-tagged"
        transport = "shm" if transport == "shm-tagged" else transport
        peer = Peer(agent_id, key, num_pages, transport, fill_seed, pulls=pulls, env=env)
        started.append(peer)
        return peer

    yield start
    for peer in started:
        peer.stop()


def _assert_idle(*peers: Peer) -> None:
    for peer in peers:
        state = peer.call("settle", timeout=30)
        assert state.get("completions") == [], f"{peer.agent_id}: unexpected completions {state}"
        assert peer.call("state")["in_flight"] == 0, f"{peer.agent_id} has transfers or receives in flight"


def _completions(peer: Peer, count: int, timeout: float = 30) -> list[dict]:
    got = peer.call("wait", count=count, timeout=timeout)["completions"]
    assert len(got) == count, f"{peer.agent_id}: {got}"
    return got


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_pages_arrive_byte_exact_and_nowhere_else(peers, transport):
    sender = peers("sender", transport=transport, fill_seed=1)
    receiver = peers("receiver", transport=transport)
    # Scattered pages on both sides: over TCP they are gathered into one message and scattered into place.
    src, dst = [7, 3, 10, 11, 20, 61, 5, 60], [50, 2, 40, 41, 33, 34, 35, 0]
    ticket = receiver.call("reserve", pages=dst, timeout=10)["ticket"]
    payload = b"first token" * 100
    assert sender.call("send", ticket=ticket, pages=src, timeout=10, payload=payload) == {}
    [sent] = _completions(sender, 1)
    [received] = _completions(receiver, 1)
    assert sent["ok"] and received["ok"], (sent, received)
    assert received["payload"] == payload  # the sender's payload arrives with the pages

    theirs, ours = sender.call("hashes")["hashes"], receiver.call("hashes")["hashes"]
    for s, d in zip(src, dst, strict=True):
        assert ours[d] == theirs[s]
    untouched = set(range(64)) - set(dst)
    assert all(ours[p] == _zero_hash(KEY) for p in untouched)
    _assert_idle(sender, receiver)
    metrics = receiver.call("state")["metrics"]
    assert metrics["bytes_received"] == len(dst) * 2 * 2 * 4 * 2 * 16 * 2
    # Over shared memory the receiver copies the pages out of the sender's memory; over TCP it cannot.
    assert metrics["transfers_pulled"] == (transport == "shm")


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_64_concurrent_requests_between_2_senders_and_2_receivers(peers, transport):
    senders = [peers(f"s{i}", num_pages=256, transport=transport, fill_seed=10 + i) for i in range(2)]
    receivers = [peers(f"r{i}", num_pages=256, transport=transport) for i in range(2)]
    rng = random.Random(0)
    free = {r.agent_id: list(range(256)) for r in receivers}
    for pool in free.values():
        rng.shuffle(pool)
    plan = []  # (sender, receiver, src pages, dst pages)
    for _ in range(64):
        s, r = rng.choice(senders), rng.choice(receivers)
        n = rng.randint(1, 6)
        plan.append((s, r, rng.sample(range(256), n), [free[r.agent_id].pop() for _ in range(n)]))
    tickets = [r.call("reserve", pages=dst, timeout=30)["ticket"] for _, r, _, dst in plan]
    for (s, _, src, _), ticket in zip(plan, tickets, strict=True):
        assert s.call("send", ticket=ticket, pages=src, timeout=30) == {}
    for peer in senders + receivers:
        expected = sum(1 for s, r, _, _ in plan if peer in (s, r))
        got = _completions(peer, expected, timeout=60)
        assert all(c["ok"] for c in got), got

    hashes = {p.agent_id: p.call("hashes")["hashes"] for p in senders + receivers}
    for s, r, src, dst in plan:
        for a, b in zip(src, dst, strict=True):
            assert hashes[r.agent_id][b] == hashes[s.agent_id][a]
    for r in receivers:
        used = {d for _, rr, _, dst in plan if rr is r for d in dst}
        assert all(hashes[r.agent_id][p] == _zero_hash(KEY) for p in set(range(256)) - used)
    _assert_idle(*senders, *receivers)


# A message per page (as before coalescing), or messages of at least 4 pages of 1 KiB, staged where scattered.
MESSAGES = {"per page": {"SPLITSERVE_KV_MAX_MESSAGES": str(1 << 30), "SPLITSERVE_KV_MIN_MESSAGE_BYTES": "1"},
            "coalesced": {"SPLITSERVE_KV_MIN_MESSAGE_BYTES": "4096"}}  # fmt: skip


@pytest.mark.parametrize("messages", list(MESSAGES))
@pytest.mark.parametrize("transport", ["tcp", "shm-tagged"])
def test_many_concurrent_tagged_transfers_of_scattered_pages_arrive_byte_exact(peers, transport, messages):
    """Three waves of 24 transfers to one receiver, all in flight at once, into pages scattered through its
    cache (each wave reusing the pages the last one filled): every one arrives whole and byte-exact."""
    env = MESSAGES[messages]
    sender = peers("sender", num_pages=512, transport=transport, fill_seed=3, env=env)
    receiver = peers("receiver", num_pages=512, transport=transport, env=env)
    rng = random.Random(4)
    for _ in range(3):
        free = rng.sample(range(512), 512)
        plan = []  # (src pages, dst pages)
        for _ in range(24):
            n = rng.randint(1, 16)
            plan.append((rng.sample(range(512), n), [free.pop() for _ in range(n)]))
        tickets = [receiver.call("reserve", pages=dst, timeout=30)["ticket"] for _, dst in plan]
        for (src, _), ticket in zip(plan, tickets, strict=True):
            assert sender.call("send", ticket=ticket, pages=src, timeout=30) == {}
        for peer in (sender, receiver):
            got = _completions(peer, len(plan), timeout=60)
            assert all(c["ok"] for c in got), got
        theirs, ours = sender.call("hashes")["hashes"], receiver.call("hashes")["hashes"]
        for src, dst in plan:
            assert [ours[d] for d in dst] == [theirs[s] for s in src]
    assert receiver.call("state")["metrics"]["checksum_failures"] == 0
    _assert_idle(sender, receiver)


def test_a_page_is_filled_by_one_transfer_at_a_time(peers):
    """Two transfers in flight into one page would race (the benchmark's random tickets once did: the later
    transfer's messages landed before the earlier one was checked, which then failed its checksum): a
    reservation naming a page still being filled, or a page twice, is refused; once the transfer ends its
    pages may be reserved again."""
    receiver = peers("receiver")
    first = msgspec.msgpack.decode(receiver.call("reserve", pages=[1, 2, 3], timeout=10)["ticket"], type=Ticket)
    refused = receiver.call("reserve", pages=[5, 3], timeout=10)
    assert f"page 3 is already being filled by transfer {first.xid}" in refused["error"]
    assert "names a page twice" in receiver.call("reserve", pages=[7, 7], timeout=10)["error"]
    receiver.call("cancel", xid=first.xid)
    [ended] = _completions(receiver, 1)
    assert not ended["ok"] and ended["xid"] == first.xid
    second = msgspec.msgpack.decode(receiver.call("reserve", pages=[5, 3], timeout=10)["ticket"], type=Ticket)
    receiver.call("cancel", xid=second.xid)
    assert not _completions(receiver, 1)[0]["ok"]
    _assert_idle(receiver)


def test_an_offer_too_large_for_one_message_goes_tagged(peers):
    n = 30000  # scattered page ids (3 bytes each in msgpack) do not fit one 64 KiB control message
    sender = peers("sender", num_pages=n, transport="shm", fill_seed=5)
    receiver = peers("receiver", num_pages=n, transport="shm")
    src = list(range(n))
    random.Random(1).shuffle(src)
    ticket = receiver.call("reserve", pages=list(range(n)), timeout=30)["ticket"]
    assert sender.call("send", ticket=ticket, pages=src, timeout=30) == {}
    assert _completions(sender, 1)[0]["ok"] and _completions(receiver, 1)[0]["ok"]
    assert receiver.call("state")["metrics"]["transfers_pulled"] == 0
    theirs, ours = sender.call("hashes")["hashes"], receiver.call("hashes")["hashes"]
    assert all(ours[d] == theirs[s] for d, s in enumerate(src))
    _assert_idle(sender, receiver)


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_a_transfers_pages_travel_in_a_few_large_messages_however_many_and_scattered(peers, transport):
    """Scattered pages (a cache after churn) on both sides: a request of 16 to 2,048 pages travels in a
    number of messages that does not grow with its pages (at most 8, each of at least 4 MiB unless the whole
    is smaller; none over shared memory, where the receiver pulls the pages), and arrives byte-exact."""
    sender = peers("sender", key=BIG_KEY, num_pages=80, transport=transport, fill_seed=7)  # pages of 1 MiB
    receiver = peers("receiver", key=BIG_KEY, num_pages=80, transport=transport)
    small = [peers(f"{role}-small", num_pages=2100, transport=transport, fill_seed=seed)  # pages of 1 KiB
             for role, seed in (("sender", 8), ("receiver", None))]  # fmt: skip
    rng = random.Random(2)
    # (sender, receiver, pages, bytes per page, messages expected over TCP)
    cases = [(sender, receiver, 16, 2**20, 4), (sender, receiver, 64, 2**20, 8)]
    cases += [(*small, n, 2**10, 1) for n in (16, 256, 2048)]
    for s, r, n, page_bytes, expected in cases:
        src, dst = rng.sample(range(s.num_pages), n), rng.sample(range(r.num_pages), n)
        ticket = r.call("reserve", pages=dst, timeout=30)["ticket"]
        assert len(msgspec.msgpack.decode(ticket, type=Ticket).message_pages) == expected
        before = s.call("state")["metrics"]["messages_sent"]
        assert s.call("send", ticket=ticket, pages=src, timeout=30) == {}
        assert _completions(s, 1)[0]["ok"] and _completions(r, 1)[0]["ok"]
        sent = s.call("state")["metrics"]["messages_sent"] - before
        assert sent == (0 if transport == "shm" else expected), (n, sent)
        theirs, ours = s.call("hashes")["hashes"], r.call("hashes")["hashes"]
        assert all(ours[d] == theirs[p] for p, d in zip(src, dst, strict=True)), f"{n} pages differ"
        assert r.call("state")["metrics"]["bytes_received"] >= n * page_bytes
    _assert_idle(sender, receiver, *small)


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_a_streamed_transfer_sends_each_message_once_its_pages_are_final(peers, transport):
    """A prompt prefilled in chunks streams its pages (`complete=False`): over TCP each message leaves as soon
    as all its pages are final, before the transfer is complete; over shared memory the offer waits for the
    last call. Either way the pages arrive byte-exact, with the payload of the last call, and only then."""
    sender = peers("sender", key=BIG_KEY, num_pages=40, transport=transport, fill_seed=9)  # pages of 1 MiB
    receiver = peers("receiver", key=BIG_KEY, num_pages=40, transport=transport)
    src, dst = [3, 4, 5, 6, 30, 31, 32, 33, 7, 8, 9, 10, 20, 22, 24, 26], list(range(16, 32))
    ticket = receiver.call("reserve", pages=dst, timeout=30)["ticket"]
    assert msgspec.msgpack.decode(ticket, type=Ticket).message_pages == [4, 4, 4, 4]

    def streamed_after(pages: list[int]) -> int:
        assert sender.call("send", ticket=ticket, pages=pages, timeout=30, complete=False) == {}
        assert sender.call("wait", count=1, timeout=1)["completions"] == []  # the handshake, the sends: no end
        return sender.call("state")["metrics"]["messages_streamed"]

    tcp = transport == "tcp"
    assert streamed_after(src[:6]) == (1 if tcp else 0)  # pages 0-3 are final: message 0
    assert streamed_after(src[:13]) == (3 if tcp else 0)  # messages 1 and 2
    assert receiver.call("wait", count=1, timeout=0.5)["completions"] == []
    refused = sender.call("send", ticket=ticket, pages=src[1:14], timeout=30, complete=False)
    assert "must extend" in refused["error"]
    assert sender.call("send", ticket=ticket, pages=src, timeout=30, payload=b"first token") == {}
    [sent], [received] = _completions(sender, 1), _completions(receiver, 1)
    assert sent["ok"] and received["ok"] and received["payload"] == b"first token", (sent, received)
    theirs, ours = sender.call("hashes")["hashes"], receiver.call("hashes")["hashes"]
    assert all(ours[d] == theirs[p] for p, d in zip(src, dst, strict=True))
    metrics = sender.call("state")["metrics"]
    assert (metrics["messages_sent"], metrics["messages_streamed"]) == ((4, 3) if tcp else (0, 0))
    _assert_idle(sender, receiver)


@pytest.mark.parametrize("who", ["sender", "receiver"])
def test_a_stream_canceled_halfway_fails_closed_on_both_sides(peers, who):
    sender = peers("sender", key=BIG_KEY, num_pages=40, fill_seed=10)
    receiver = peers("receiver", key=BIG_KEY, num_pages=40)
    ticket = receiver.call("reserve", pages=list(range(16)), timeout=30)["ticket"]
    sender.call("send", ticket=ticket, pages=list(range(9)), timeout=30, complete=False)
    assert sender.call("wait", count=1, timeout=1)["completions"] == []
    assert sender.call("state")["metrics"]["messages_streamed"] == 2
    if who == "sender":
        sender.call("cancel", xid=_xid(ticket), receiver_id="receiver")
    else:
        receiver.call("cancel", xid=_xid(ticket))
    [s], [r] = _completions(sender, 1), _completions(receiver, 1)
    assert not s["ok"] and not r["ok"] and f"canceled by the {who}" in s["error"] + r["error"], (s, r)
    _assert_idle(sender, receiver)


def test_incompatible_key_is_refused_with_a_clear_error(peers):
    receiver = peers("receiver")
    other = msgspec.structs.replace(KEY, dtype="bf16", head_dim=32)
    sender = peers("sender", key=other)
    ticket = receiver.call("reserve", pages=[1, 2], timeout=10)["ticket"]
    # The sender checks the ticket's key itself...
    error = sender.call("send", ticket=ticket, pages=[1, 2], timeout=10)["error"]
    assert "IncompatiblePeerError" in error and "dtype: 'bf16' here, 'fp16' there" in error
    # ...and a sender that claims a matching key is refused at the handshake by the receiver.
    assert sender.call("send", ticket=ticket, pages=[1, 2], timeout=10, forge_key=True) == {}
    [failed] = _completions(sender, 1)
    assert not failed["ok"] and "refused the handshake" in failed["error"] and "head_dim" in failed["error"]
    receiver.call("cancel", xid=msgspec.msgpack.decode(ticket, type=Ticket).xid)
    [canceled] = _completions(receiver, 1)
    assert not canceled["ok"]
    _assert_idle(sender, receiver)


def _big_transfer(peers, transport="tcp"):
    """A sender and a receiver with 32 pages of 1 MiB: a transfer long enough to kill a peer in the middle."""
    sender = peers("sender", key=BIG_KEY, num_pages=32, transport=transport, fill_seed=3)
    receiver = peers("receiver", key=BIG_KEY, num_pages=32, transport=transport)
    # One small transfer first, so both know each other (handshake done, endpoints up).
    warm = receiver.call("reserve", pages=[0], timeout=10)["ticket"]
    sender.call("send", ticket=warm, pages=[0], timeout=10)
    assert _completions(sender, 1)[0]["ok"] and _completions(receiver, 1)[0]["ok"]
    assert receiver.call("state")["metrics"]["transfers_pulled"] == (transport == "shm")
    return sender, receiver


def _xid(ticket: bytes) -> int:
    return msgspec.msgpack.decode(ticket, type=Ticket).xid


def _assert_untouched(receiver: Peer, pages: list[int]) -> None:
    hashes = receiver.call("hashes")["hashes"]
    assert all(hashes[p] == _zero_hash(BIG_KEY) for p in pages), "a failed transfer wrote into its pages"


def test_sender_killed_mid_transfer_fails_the_reservation_within_its_deadline(peers):
    sender, receiver = _big_transfer(peers, "tcp")  # tagged messages: killed while its pages are on the wire
    ticket = receiver.call("reserve", pages=list(range(32)), timeout=3)["ticket"]
    sender.call("send", ticket=ticket, pages=list(range(32)), timeout=3)
    sender.kill()
    started = time.monotonic()
    [failed] = _completions(receiver, 1, timeout=10)
    assert not failed["ok"] and "no KV arrived within 3.0s" in failed["error"]
    assert time.monotonic() - started < 3 + 2
    _assert_idle(receiver)


def test_sender_killed_before_offering_fails_the_reservation_within_its_deadline(peers):
    sender, receiver = _big_transfer(peers, "shm")
    receiver.call("reserve", pages=list(range(32)), timeout=3)
    sender.kill()
    started = time.monotonic()
    [failed] = _completions(receiver, 1, timeout=10)
    assert not failed["ok"] and "no KV arrived within 3.0s" in failed["error"]
    assert time.monotonic() - started < 3 + 2
    _assert_untouched(receiver, list(range(1, 32)))  # page 0 holds the warm-up transfer
    _assert_idle(receiver)


def test_pages_offered_by_a_sender_that_dies_still_arrive_byte_exact(peers):
    """Shared memory outlives its owner: an offer made before the sender was killed is still good."""
    sender, receiver = _big_transfer(peers, "shm")
    src, dst = [9, 8, 30, 31, 2], [3, 4, 5, 20, 21]
    ticket = receiver.call("reserve", pages=dst, timeout=10)["ticket"]
    receiver.call("hold", seconds=10)  # busy elsewhere: the offer waits in its queue
    sender.call("send", ticket=ticket, pages=src, timeout=10, payload=b"token")
    sender.kill()
    [got] = _completions(receiver, 1)
    assert got["ok"] and got["payload"] == b"token", got
    expected = random_pages(BIG_KEY, 32, seed=3)
    hashes = receiver.call("hashes")["hashes"]
    for s, d in zip(src, dst, strict=True):
        assert hashes[d] == hashlib.sha256(expected[s].numpy().tobytes()).hexdigest()
    _assert_idle(receiver)


def test_an_offer_taken_after_its_deadline_is_discarded(peers):
    """Fail closed: a receiver too busy to copy before the sender's deadline must not use the pages, which
    the sender may have reused by then."""
    sender, receiver = _big_transfer(peers, "shm")
    ticket = receiver.call("reserve", pages=list(range(1, 9)), timeout=30)["ticket"]
    receiver.call("hold", seconds=10)
    sender.call("send", ticket=ticket, pages=list(range(8)), timeout=0.5)
    [s] = _completions(sender, 1)
    assert not s["ok"] and "did not take the KV within 0.5s" in s["error"]
    [r] = _completions(receiver, 1)
    assert not r["ok"] and "offer expired" in r["error"]
    _assert_untouched(receiver, list(range(1, 9)))
    _assert_idle(sender, receiver)


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_receiver_killed_mid_transfer_fails_the_send_within_its_deadline(peers, transport):
    sender, receiver = _big_transfer(peers, transport)
    ticket = receiver.call("reserve", pages=list(range(32)), timeout=30)["ticket"]
    receiver.kill()
    started = time.monotonic()
    sender.call("send", ticket=ticket, pages=list(range(32)), timeout=3)
    [failed] = _completions(sender, 1, timeout=10)
    # UCX may notice the reset TCP connection first; else the deadline ends it.
    assert not failed["ok"]
    assert "did not take the KV within 3.0s" in failed["error"] or "Connection reset" in failed["error"]
    assert time.monotonic() - started < 3 + 2
    _assert_idle(sender)


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_a_ticket_from_a_receiver_that_died_before_first_contact_fails_the_send_not_the_sender(peers, transport):
    """A restarted prefill worker may be handed a ticket of a decode worker that has died since: UCX cannot
    connect to it (on one host it says so at once); the send fails, and the sender goes on serving others."""
    sender = peers("sender", transport=transport, fill_seed=2)
    dead, alive = peers("dead", transport=transport), peers("alive", transport=transport)
    ticket = dead.call("reserve", pages=[1, 2], timeout=30)["ticket"]
    dead.kill()
    started = time.monotonic()
    assert sender.call("send", ticket=ticket, pages=[3, 4], timeout=3) == {}
    [failed] = _completions(sender, 1, timeout=10)
    assert not failed["ok"] and time.monotonic() - started < 3 + 2, failed
    ticket = alive.call("reserve", pages=[1, 2], timeout=10)["ticket"]
    assert sender.call("send", ticket=ticket, pages=[3, 4], timeout=10) == {}
    assert _completions(sender, 1)[0]["ok"] and _completions(alive, 1)[0]["ok"]
    _assert_idle(sender, alive)


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_receiver_cancel_frees_both_sides(peers, transport):
    sender, receiver = _big_transfer(peers, transport)
    ticket = receiver.call("reserve", pages=list(range(32)), timeout=30)["ticket"]
    receiver.call("hold", seconds=10)  # the pages are on their way (tagged) or offered (shm), not yet in
    sender.call("send", ticket=ticket, pages=list(range(32)), timeout=30)
    receiver.call("cancel", xid=_xid(ticket))
    [r] = _completions(receiver, 1)
    [s] = _completions(sender, 1)
    assert not r["ok"] and "canceled by the receiver" in r["error"]
    # Tagged, the sender may have finished its sends before it heard of the cancel; an offer is refused.
    assert not s["ok"] or transport == "tcp", s
    _assert_idle(sender, receiver)


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_ticket_canceled_by_receiver_before_send_is_refused(peers, transport):
    sender, receiver = _big_transfer(peers, transport)
    raw = receiver.call("reserve", pages=[1, 2, 3], timeout=30)["ticket"]
    # A ticket this sender was handed but that the receiver canceled first is refused without sending.
    receiver.call("cancel", xid=_xid(raw))
    assert not _completions(receiver, 1)[0]["ok"]
    time.sleep(0.2)  # let the cancel reach the sender
    sender.call("send", ticket=raw, pages=[4, 5, 6], timeout=30)
    [s] = _completions(sender, 1)
    assert not s["ok"] and "canceled by the receiver" in s["error"]
    _assert_untouched(receiver, [1, 2, 3])
    _assert_idle(sender, receiver)


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_sender_cancel_mid_transfer_frees_both_sides(peers, transport):
    sender, receiver = _big_transfer(peers, transport)
    ticket = receiver.call("reserve", pages=list(range(32)), timeout=30)["ticket"]
    if transport == "shm":  # the cancel reaches the receiver before it takes the offer
        receiver.call("hold", seconds=10)
    sender.call("send", ticket=ticket, pages=list(range(32)), timeout=30, cancel_at_once=True)
    [r] = _completions(receiver, 1)
    [s] = _completions(sender, 1)
    assert not s["ok"] and "canceled by the sender" in s["error"]
    assert not r["ok"] and "canceled by the sender" in r["error"]  # fail closed: the pages are not used
    _assert_idle(sender, receiver)


def test_messages_roundtrip_and_malformed_frames_are_refused():
    from splitserve.kv_transfer.messages import (
        Cancel,
        Done,
        Hello,
        Offer,
        ProtocolError,
        SharedPages,
        Taken,
        decode_control,
        decode_done,
        frame,
    )

    cancel = Cancel("r", 7, "why")
    assert decode_control(frame(cancel) + bytes(100)) == cancel  # trailing buffer space is ignored
    for message in (
        Hello("s", b"addr", KEY, SharedPages(rkey=b"\x00key", address=1 << 46, nbytes=4096)),
        Hello("s", b"addr", KEY, None, DEVICE_PAGES),
        Offer("s", "r", 3, [5, 1, 2], deadline=123.5, payload=b"tok"),
        Taken("r", 3, ok=False, reason="late"),
    ):
        assert decode_control(frame(message)) == message
    assert decode_done(frame(Done(ok=False, reason="x"))) == Done(ok=False, reason="x")
    for garbage in (b"", b"\x05\x00\x00\x00abc", b"\x03\x00\x00\x00\xc1\xc1\xc1", frame(Done(ok=True))):
        with pytest.raises(ProtocolError):
            decode_control(garbage)  # truncated, overlong length, not msgpack, a Done where control is due
    with pytest.raises(ProtocolError, match="protocol version 9"):
        decode_control(frame(Cancel("r", 1, "x", version=9)))


DEVICE_PAGES = DevicePages(host="this-host", device=0, handle=b"\x01" * 64, storage_bytes=1 << 30, storage_offset=0,
                           ref_counter_handle=b"/torch_123", ref_counter_offset=8, event_handle=b"\x02" * 64,
                           event_sync_required=True, offset=4096, nbytes=1 << 20)  # fmt: skip


def test_cuda_pages_are_offered_through_ipc_on_their_own_host_only(monkeypatch):
    """A sender's CUDA pages travel in its Hello as a CUDA IPC handle (the receiver then copies them device to
    device, `Offer`/`Taken` as for shared host memory); a receiver on another host (another boot id), or without
    CUDA, does not try to open them and gets tagged messages instead. CPU pages never carry a handle, and
    SPLITSERVE_KV_CUDA_IPC=0 turns the handles off. (Opening one is the GPU check's `kv` section.)"""
    import torch

    from splitserve.kv_transfer import shared_memory

    assert shared_memory.describe_device(torch.zeros(4)) is None
    assert shared_memory.host_id()  # Linux: the kernel's boot id
    assert shared_memory.RemotePages.open_device(DEVICE_PAGES) is None  # another host's handle: not even tried
    here = msgspec.structs.replace(DEVICE_PAGES, host=shared_memory.host_id())
    if not torch.cuda.is_available():
        assert shared_memory.RemotePages.open_device(here) is None  # this host, no device: tagged messages
    monkeypatch.setenv(shared_memory.CUDA_IPC_ENV, "0")
    monkeypatch.setattr(torch.Tensor, "device", property(lambda t: torch.device("cuda")))
    assert shared_memory.describe_device(torch.zeros(4)) is None


def test_malformed_control_frames_are_dropped_and_the_agent_keeps_working(peers):
    sender = peers("sender", fill_seed=5)
    receiver = peers("receiver")
    raw = receiver.call("reserve", pages=[4, 5], timeout=10)["ticket"]
    address = msgspec.msgpack.decode(raw, type=Ticket).address
    for payload in (b"", b"\xff" * 64, b"\x10\x00\x00\x00" + b"\xc1" * 16, bytes(70_000)):
        assert sender.call("garbage", address=address, payload=payload) == {}
    assert sender.call("send", ticket=raw, pages=[1, 2], timeout=10) == {}
    assert _completions(sender, 1)[0]["ok"] and _completions(receiver, 1)[0]["ok"]
    theirs, ours = sender.call("hashes")["hashes"], receiver.call("hashes")["hashes"]
    assert ours[4:6] == theirs[1:3]
    assert receiver.call("state")["metrics"]["malformed_messages"] == 4
    _assert_idle(sender, receiver)


@pytest.mark.parametrize("fault", ["truncate", "corrupt"])
@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_pages_that_did_not_arrive_whole_fail_the_transfer(transport, fault):
    """A transfer damaged on arrival (SPLITSERVE_KV_FAULT: its last page missing, or a byte of it changed) fails
    its checksum and is reported failed, never complete; the next one arrives byte-exact."""
    sender = Peer("sender", KEY, 64, transport, fill_seed=3)
    receiver = Peer("receiver", KEY, 64, transport, None, env={"SPLITSERVE_KV_FAULT": fault})
    try:
        src, dst = [4, 5, 6, 30, 9], [10, 11, 12, 13, 50]
        for attempt in range(2):
            ticket = receiver.call("reserve", pages=dst, timeout=10)["ticket"]
            assert sender.call("send", ticket=ticket, pages=src, timeout=10, payload=b"t") == {}
            [received] = _completions(receiver, 1)
            _completions(sender, 1)
            if attempt == 0:
                assert not received["ok"] and "checksum" in received["error"], received
            else:
                assert received["ok"], received
        theirs, ours = sender.call("hashes")["hashes"], receiver.call("hashes")["hashes"]
        assert [ours[d] for d in dst] == [theirs[s] for s in src]
        assert receiver.call("state")["metrics"]["checksum_failures"] == 1
        _assert_idle(sender, receiver)
    finally:
        sender.stop()
        receiver.stop()
