"""A prefill worker streams a chunked prompt's pages: after each chunk, the pages it completed (of those the
decode worker reserved) go to the transfer agent as a prefix of the transfer, and the first token with the last
pages when the prompt is done. Aborts and failed streams leave no page taken and tell the router what it
expects. The agent here is a recording stand-in (tests/test_kv_transfer.py has the real one stream)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from splitserve.engine.config import EngineConfig
from splitserve.engine.params import SamplingParams
from splitserve.kv_transfer.link import Completion, Side
from splitserve.kv_transfer.messages import CompatKey, Ticket
from splitserve.prefill.engine import PrefillEngine
from splitserve.prefill.worker import PrefillWorker
from splitserve.protocol import Abort, Prefill, PrefillDone

PAGE = 4
PROMPT = list(range(100, 140))  # 40 tokens: 10 pages, prefilled 16 tokens a pass (3 passes)


@dataclass
class RecordingAgent:
    sends: list[tuple[int, list[int], bool]] = field(default_factory=list)  # (xid, pages, complete)
    canceled: list[int] = field(default_factory=list)
    completions: list[Completion] = field(default_factory=list)

    def send(self, ticket: Ticket, pages: list[int], timeout_s: float, payload: bytes = b"", complete: bool = True):
        self.sends.append((ticket.xid, list(pages), complete))

    def cancel(self, xid: int, receiver_id: str | None = None) -> None:
        self.canceled.append(xid)

    def poll(self) -> list[Completion]:
        out, self.completions = self.completions, []
        return out

    @property
    def num_in_flight(self) -> int:
        return 0

    def end(self, xid: int, ok: bool, error: str = "") -> None:
        self.completions.append(Completion(Side.SEND, "decode-0", xid, ok, error))


@pytest.fixture
def worker(tiny_llama_gqa):
    config = EngineConfig(model=str(tiny_llama_gqa), dtype="fp32", page_size=PAGE, max_num_batched_tokens=16,
                          prefix_caching=False)  # fmt: skip
    told: list[PrefillDone] = []
    agent = RecordingAgent()
    w = PrefillWorker(PrefillEngine(config), agent, told.append, kv_timeout_s=30)
    yield w, agent, told
    assert w.allocator.num_available == w.allocator.capacity  # every page back


def _prefill(w: PrefillWorker, job: int, reserved: int) -> None:
    key = CompatKey("m", "float32", PAGE, 2, 2, 8)
    ticket = Ticket("decode-0", b"address", job, [reserved], key)
    w.on_message(Prefill(job, PROMPT, SamplingParams(max_tokens=4, temperature=0), ticket))


@pytest.mark.parametrize("reserved", [10, 6])
def test_each_chunk_streams_the_pages_it_completed(worker, reserved):
    """All 10 pages reserved, or the last 6 (the decode worker holds the first 4 cached): after the 16- and 32-
    token passes the complete pages among the reserved ones go, each call a longer prefix; then all, complete."""
    w, agent, told = worker
    _prefill(w, 1, reserved)
    w.step()
    w.step()
    w.step()
    request_pages = agent.sends[-1][1]
    assert len(request_pages) == reserved
    first = 10 - reserved
    streamed = [(len(pages), complete) for _, pages, complete in agent.sends]
    expected = [(n - first, False) for n in (4, 8) if n > first] + [(reserved, True)]
    assert streamed == expected
    assert all(pages == request_pages[: len(pages)] for _, pages, _ in agent.sends)  # prefixes of the same pages
    assert not told and not w.idle()
    agent.end(1, ok=True)
    w.step()
    assert [(d.job, d.ok) for d in told] == [(1, True)] and w.idle()


def test_an_abort_mid_stream_cancels_it_and_ignores_its_end(worker):
    w, agent, told = worker
    _prefill(w, 2, 10)
    w.step()  # 4 pages streamed
    w.on_message(Abort(2))
    assert agent.canceled == [2] and w.allocator.num_available == w.allocator.capacity
    assert not w.idle()  # until the canceled stream ends: UCX may still read the freed pages
    agent.end(2, ok=False, error="canceled by the sender")
    w.step()
    assert not told and w.idle()  # an aborted prefill is not reported, as before streaming


def test_a_stream_that_fails_mid_prefill_ends_the_prefill(worker):
    w, agent, told = worker
    _prefill(w, 3, 10)
    w.step()
    agent.end(3, ok=False, error="the receiver did not take the KV within 30.0s")
    w.step()
    assert [(d.job, d.ok, d.error) for d in told] == [(3, False, "the receiver did not take the KV within 30.0s")]
    assert len(agent.sends) == 1 and w.idle()  # nothing more sent; the prompt's pages are free (fixture)
