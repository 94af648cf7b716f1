"""Streaming text: incremental detokenization and `LLM.stream` on the default model."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from splitserve import LLM, SamplingParams
from splitserve.engine.detokenizer import IncrementalDetokenizer

TEXTS = ["Hello world, héllo wörld 你好 😀 done.", "  spaced   out\n\nlines", "def f(x):\n    return x**2  # ✓"]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("prompt_tokens", [0, 1, 3])
def test_incremental_text_equals_decoding_all_at_once(smollm2, text, prompt_tokens):
    tok = AutoTokenizer.from_pretrained(smollm2)
    ids = tok(text).input_ids
    detok = IncrementalDetokenizer(tok, ids[:prompt_tokens])
    pieces = [detok.push(t) for t in ids[prompt_tokens:]]
    whole = tok.decode(ids, skip_special_tokens=True)
    assert "".join(pieces) == whole[len(tok.decode(ids[:prompt_tokens], skip_special_tokens=True)) :]
    assert "\ufffd" not in "".join(pieces)  # never a half character


@pytest.fixture(scope="module")
def smol_llm(smollm2) -> LLM:
    return LLM(str(smollm2), dtype="fp32")


@pytest.mark.slow
def test_stream_yields_the_generated_text(smol_llm):
    params = SamplingParams(max_tokens=24, temperature=0)
    chat = [{"role": "user", "content": "Write one sentence about the sea."}]
    assert "".join(smol_llm.stream(chat, params)) == smol_llm.chat(chat, params, use_tqdm=False)[0].text
    assert "".join(smol_llm.stream("The capital of France is", params)) == (
        smol_llm.generate("The capital of France is", params, use_tqdm=False)[0].text
    )


@pytest.mark.slow
def test_stopping_a_stream_early_frees_its_request(smol_llm):
    stream = smol_llm.stream("Once upon a time", SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))
    next(stream)
    assert smol_llm.engine.allocator.num_free < smol_llm.engine.allocator.capacity
    stream.close()
    assert not smol_llm.engine.has_unfinished()
    # (the autouse fixture then checks that every page is free)


def test_a_server_sent_event_stays_on_one_line_for_line_splitting_clients():
    """Text with U+2028, U+2029 or NEL (JSON leaves them raw) arrives whole through httpx's aiter_lines, which
    splits where str.splitlines() does (the load benchmark met one in a sampled answer)."""
    import json

    from splitserve.router.http.formats import sse

    payload = {"choices": [{"text": "a\u2028b\x85c\u2029d\u00e9\u2027"}]}
    event = sse(payload).decode()
    (line,) = [x for x in event.splitlines() if x]
    assert json.loads(line.removeprefix("data: ")) == payload and event.endswith("\n\n")
