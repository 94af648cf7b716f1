"""A KV-transfer peer in its own process, for tests and benchmarks: `Peer` starts it (spawned: UCX is
not fork-safe) and drives it over a pipe with msgpack-encoded commands. The process owns one
`TransferAgent` over a page tensor of random or zero bytes (on the CPU in UCX shared memory where UCX can
allocate it and `pulls` allows, or on a GPU) and polls it between commands, on one thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import multiprocessing
import os
import time
from typing import Any

import msgspec

from splitserve.kv_transfer.messages import CompatKey
from splitserve.kv_transfer.shared_memory import CUDA_IPC_ENV

TRANSPORTS = {
    "tcp": {"UCX_TLS": "tcp,self", "UCX_NET_DEVICES": "lo", "UCX_TCP_TX_SEG_SIZE": "1M", "UCX_TCP_RX_SEG_SIZE": "1M"},
    "shm": {"UCX_TLS": "posix,sysv,self"},
    "auto": {},  # whatever UCX picks by itself, as the workers run
}
_spawn = multiprocessing.get_context("spawn")  # UCX is not fork-safe


def page_shape(key: CompatKey) -> tuple[int, ...]:
    return (key.num_layers, 2, key.page_size, key.num_kv_heads, key.head_dim)


def random_pages(key: CompatKey, num_pages: int, seed: int):
    """The page contents of a peer started with `fill_seed=seed` (random bytes, the same in every process)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (num_pages, 2 * math.prod(page_shape(key))), dtype=torch.uint8, generator=g)


def _main(conn, agent_id: str, key_fields: dict, num_pages: int, transport: str, fill_seed: int | None,
          options: dict) -> None:  # fmt: skip
    os.environ.update({**TRANSPORTS[transport], **options["env"]})
    import torch

    from splitserve.kv_transfer.agent import TransferAgent, TransferContext
    from splitserve.kv_transfer.messages import CompatKey, Ticket

    torch.set_num_threads(1)  # copies run on one core, as memcpy in the benchmark does
    key = CompatKey(**key_fields)
    context = TransferContext()
    shape, device = (num_pages, *page_shape(key)), options["device"]
    # Pages outside UCX's shared memory cannot be mapped by a receiver: it is sent tagged messages instead (and
    # CUDA pages are not offered through CUDA IPC).
    allocate = context.memory.zeros if options["pulls"] else torch.zeros
    if not options["pulls"]:
        os.environ[CUDA_IPC_ENV] = "0"
    pages = allocate(shape, dtype=torch.float16, device=device)
    if fill_seed is not None:
        pages.view(torch.uint8).view(num_pages, -1).copy_(random_pages(key, num_pages, fill_seed).to(device))
    agent = TransferAgent(pages, key, agent_id, context)
    completions: list[dict] = []
    hold_until = 0.0  # no polling before then (or the next wait): a peer whose loop is busy elsewhere

    def poll() -> None:
        completions.extend(
            {
                "side": c.side.value,
                "receiver_id": c.receiver_id,
                "xid": c.xid,
                "ok": c.ok,
                "error": c.error,
                "payload": c.payload,
            }
            for c in agent.poll()
        )

    while True:
        if time.monotonic() >= hold_until:
            poll()
        if not conn.poll(0 if agent.num_in_flight else 0.001):  # an idle peer leaves the cores to others
            continue
        cmd = msgspec.msgpack.decode(conn.recv_bytes())
        op = cmd["op"]
        reply: dict[str, Any] = {}
        try:
            if op == "reserve":
                reply["ticket"] = msgspec.msgpack.encode(agent.reserve(cmd["pages"], cmd["timeout"]))
            elif op == "send":
                ticket = msgspec.msgpack.decode(cmd["ticket"], type=Ticket)
                if cmd.get("forge_key"):
                    ticket = msgspec.structs.replace(ticket, key=key)
                agent.send(ticket, cmd["pages"], cmd["timeout"], cmd.get("payload", b""), cmd.get("complete", True))
                if cmd.get("cancel_at_once"):  # before any progress: the sends are surely in flight
                    agent.cancel(ticket.xid, ticket.receiver_id)
            elif op == "cancel":
                agent.cancel(cmd["xid"], cmd.get("receiver_id"))
            elif op == "hold":
                hold_until = time.monotonic() + cmd["seconds"]
            elif op == "wait":
                hold_until = 0.0
                deadline = time.monotonic() + cmd["timeout"]
                while len(completions) < cmd["count"] and time.monotonic() < deadline:
                    poll()
                reply["completions"], completions[:] = list(completions), []
            elif op == "settle":  # poll until nothing has been in flight for a while (or the time is up)
                hold_until = 0.0
                deadline = time.monotonic() + cmd["timeout"]
                quiet_since = time.monotonic()
                # A canceled transfer's late messages (drained, see the agent) may still be on their way.
                while time.monotonic() - quiet_since < 0.3 and time.monotonic() < deadline:
                    poll()
                    if agent.num_in_flight:
                        quiet_since = time.monotonic()
                reply["completions"], completions[:] = list(completions), []
            elif op == "state":
                reply["in_flight"] = agent.num_in_flight
                reply["metrics"] = vars(agent.metrics)
            elif op == "timed_sends":  # send each ticket in turn, one at a time; answer each one's seconds
                reply["seconds"] = []
                for raw in cmd["tickets"]:
                    started = time.perf_counter()
                    agent.send(msgspec.msgpack.decode(raw, type=Ticket), cmd["pages"], cmd["timeout"])
                    while not completions:
                        poll()
                    if device != "cpu":  # the receiver's pages are ready once its copies are done
                        torch.cuda.synchronize()
                    reply["seconds"].append(time.perf_counter() - started)
                    if not completions.pop()["ok"]:
                        raise RuntimeError("a timed transfer failed")
            elif op == "garbage":  # a malformed control frame to another agent, as a broken peer would send
                import numpy as np
                import ucxx._lib.libucxx as ucx
                from ucxx._lib.arr import Array

                from splitserve.kv_transfer.agent import CONTROL_TAG

                junk = np.frombuffer(cmd["payload"], dtype=np.uint8).copy()
                req = agent.link.endpoint(cmd["address"]).tag_send(Array(junk), tag=ucx.UCXXTag(CONTROL_TAG))
                while not req.completed:
                    poll()
            elif op == "hashes":
                raw = pages.view(torch.uint8).view(num_pages, -1).cpu()
                reply["hashes"] = [hashlib.sha256(raw[i].numpy().tobytes()).hexdigest() for i in range(num_pages)]
            elif op == "stop":
                agent.close()
                conn.send_bytes(msgspec.msgpack.encode({}))
                return
        except Exception as e:  # the test asserts on the message
            reply["error"] = f"{type(e).__name__}: {e}"
        conn.send_bytes(msgspec.msgpack.encode(reply))


class Peer:
    """The test's handle on one peer process."""

    def __init__(
        self, agent_id: str, key: CompatKey, num_pages: int, transport: str, fill_seed: int | None,
        device: str = "cpu", pulls: bool = True, env: dict[str, str] | None = None,
    ):  # fmt: skip
        """`pulls` False keeps CPU pages out of shared memory (tagged messages even on one host); `env` adds
        to the transport's environment (e.g. `SPLITSERVE_KV_MAX_MESSAGES`)."""
        self.agent_id = agent_id
        self.num_pages = num_pages
        self._conn, child = _spawn.Pipe()
        fields = msgspec.structs.asdict(key)
        options = {"device": device, "pulls": pulls, "env": env or {}}
        self.process = _spawn.Process(
            target=_main, args=(child, agent_id, fields, num_pages, transport, fill_seed, options), daemon=True
        )
        self.process.start()

    def call(self, op: str, **args: Any) -> dict:
        self._conn.send_bytes(msgspec.msgpack.encode({"op": op, **args}))
        answer_within = args.get("timeout", 0) + 60
        if not self._conn.poll(answer_within):
            raise TimeoutError(f"peer {self.agent_id} did not answer {op!r} in {answer_within}s")
        return msgspec.msgpack.decode(self._conn.recv_bytes())

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(10)

    def stop(self) -> None:
        if self.process.is_alive():
            with contextlib.suppress(TimeoutError, OSError, EOFError):
                self.call("stop")
        self.kill()
