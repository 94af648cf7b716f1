"""The router <-> worker protocol and the router's text handling, without processes: messages round-trip,
anything malformed or of another version is refused, nothing in the package pickles; stop strings are cut
wherever they fall across tokens."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

import splitserve
from splitserve.engine.params import SamplingParams, TokenLogprob
from splitserve.kv_transfer.messages import CompatKey, Ticket
from splitserve.model.tokenizer import load_tokenizer
from splitserve.protocol import (
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    Abort,
    FirstToken,
    Heartbeat,
    KvStats,
    Load,
    Prefill,
    ProtocolError,
    Role,
    TokenOut,
    Tokens,
    WorkerInfo,
    decode_first_token,
    decode_to_router,
    decode_to_worker,
    encode,
)
from splitserve.router.http.output import TextStream

KEY = CompatKey("m", "bfloat16", 16, 2, 2, 64)


def test_messages_round_trip():
    info = WorkerInfo("decode-1", Role.DECODE, "m", 512, 16, 100, 8, KEY, 123, "host")
    beat = Heartbeat(info, Load(10, 1, 2, 300), KvStats(1, 2, 0.5, 0.25, 0), 0.01)
    assert decode_to_router(encode(beat)) == beat
    tokens = Tokens([TokenOut(3, 17, None, TokenLogprob(17, -0.5, ((17, -0.5), (4, -1.5)))), TokenOut(4, 2, "stop")],
                    Load(1, 2, 3, 4))  # fmt: skip
    assert decode_to_router(encode(tokens)) == tokens
    ticket = Ticket("r", b"\x00addr", 7, [2, 1], KEY)
    prefill = Prefill(9, [1, 2, 3], SamplingParams(max_tokens=4, temperature=0.5, seed=3), ticket)
    assert decode_to_worker(encode(prefill)) == prefill
    first = FirstToken(5, None, b"\x01" * 5056)
    assert decode_first_token(encode(first)) == first


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"\x93\x01\x02",
        msgspec.msgpack.encode({"type": "Abort", "job": 1, "version": PROTOCOL_VERSION + 1}),  # another version
        msgspec.msgpack.encode({"type": "Abort", "job": "one"}),  # wrong type
        msgspec.msgpack.encode({"type": "Launch", "job": 1}),  # unknown message
        msgspec.msgpack.encode(
            {
                "type": "Prefill",
                "job": 1,
                "prompt_token_ids": [1],
                "params": {"top_p": 7},
                "ticket": msgspec.to_builtins(Ticket("r", b"", 1, [1], KEY)),
            }
        ),
        b"\x00" * (MAX_MESSAGE_BYTES + 1),
    ],
)
def test_malformed_frames_are_refused(frame):
    with pytest.raises(ProtocolError):
        decode_to_worker(frame)


def test_a_worker_message_is_not_a_router_message():
    with pytest.raises(ProtocolError):
        decode_to_router(encode(Abort(1)))


def test_nothing_pickles():
    """No module of the package imports pickle (or a wrapper of it): nothing on the wire can run code."""
    root = Path(splitserve.__file__).parent
    for path in root.rglob("*.py"):
        text = path.read_text()
        for banned in ("import pickle", "cloudpickle", "import dill", "torch.load(", "recv_pyobj", "send_pyobj"):
            assert banned not in text, f"{path.relative_to(root)} uses {banned}"


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return load_tokenizer(smollm2)


def _stream(tokenizer, text: str, stop: list[str]) -> tuple[str, bool]:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    stream = TextStream(tokenizer, [1], stop)
    out = ""
    for token in ids:
        out += stream.push(token)
        if stream.stopped:
            break
    return out + stream.flush(), stream.stopped


@pytest.mark.parametrize(
    ("stop", "expected"),
    [
        ([], "The capital of France is Paris. It is lovely."),
        (["Paris"], "The capital of France is "),
        (["ris. It"], "The capital of France is Pa"),  # spans three tokens
        (["lovely.", "France"], "The capital of "),  # the earliest wins
        (["The"], ""),
        (["Parisian"], "The capital of France is Paris. It is lovely."),  # a prefix that never completes
        (["."], "The capital of France is Paris"),
    ],
)
def test_stop_strings(tokenizer, stop, expected):
    text, stopped = _stream(tokenizer, "The capital of France is Paris. It is lovely.", stop)
    assert text == expected
    assert stopped == (expected != "The capital of France is Paris. It is lovely.")


def test_the_router_does_not_load_the_engine():
    """The router builds, checks and relays requests; it never imports the model, sampler or schedulers
    (`import splitserve` loads `LLM` only when it is used)."""
    code = (
        "import sys, splitserve.router.http.server; print(sorted(m for m in sys.modules if m.startswith('splitserve')))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for engine_part in ("splitserve.llm", "splitserve.engine.runner", "splitserve.engine.request",
                        "splitserve.engine.sampling", "splitserve.model.llama", "splitserve.decode",
                        "splitserve.prefill", "splitserve.kernels"):  # fmt: skip
        assert f"'{engine_part}" not in loaded, engine_part
