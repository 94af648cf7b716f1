"""Benchmark workloads: what each request asks (prompt with an exact token count, output length) and when
it arrives.

Workloads: synthetic lengths from a distribution, a ShareGPT-format JSON file, shared-prefix groups (many
requests behind one long system prompt), multi-turn sessions (each turn sent when the previous answer
arrived, carrying the conversation so far), and phases (traffic that shifts: each phase its own lengths and
rate for its own duration). Arrivals: Poisson at a rate, gamma with a burstiness factor
(1 is Poisson, below 1 burstier), or all at once (rate inf, with the client's concurrency as the limit).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

# Plain words that tokenize stably, to build prompts of an exact token count.
_WORDS = (
    "the a of to and in is it that for on with as was at by be this from or have an are not but had they you "
    "which one all were we when there can been has more if will out so said what up its about into than them "
    "time only new some could these two may first then do any like my now over such our man me even most made "
    "after also did many before must through back years where much your way well down should because each just "
    "those people how too little state good very make world still own see men work long get here between both "
    "life being under never day same another know while last might us great old year off come since against go"
).split()


@dataclass
class BenchRequest:
    """One request. `prompt` (text or token ids) for /v1/completions; `messages` for chat."""

    prompt: str | list[int] | None
    max_tokens: int
    prompt_tokens: int  # exact, by the workload's tokenizer (chat: the messages' text, before the template)
    messages: list[dict[str, str]] | None = None
    arrival_s: float = 0.0
    session: int | None = None  # multi-turn: the session, and this request's turn in it
    turn: int = 0
    follow_ups: list[BenchRequest] = field(default_factory=list)  # a session's later turns, sent in order
    with_history: bool = True  # a later turn carries the conversation so far (else only its own messages)
    phase: int | None = None  # phased workloads: which phase sent it


class LengthDist:
    """A token-length distribution: `fixed:N`, `uniform:MIN,MAX`, `normal:MEAN,STD`, `lognormal:MEDIAN,SIGMA`;
    samples are rounded and clipped to [1, max_len]."""

    KINDS = ("fixed", "uniform", "normal", "lognormal")

    def __init__(self, spec: str, max_len: int = 1 << 20):
        kind, _, args = spec.partition(":")
        try:
            values = [float(x) for x in args.split(",")] if args else []
        except ValueError:
            values = []
        expected = {"fixed": 1, "uniform": 2, "normal": 2, "lognormal": 2}.get(kind)
        if expected is None or len(values) != expected:
            raise ValueError(f"not a length distribution: {spec!r} (fixed:N, uniform:MIN,MAX, normal:MEAN,STD, "
                             "lognormal:MEDIAN,SIGMA)")  # fmt: skip
        self.spec, self.kind, self.values, self.max_len = spec, kind, values, max_len

    def sample(self, rng: random.Random) -> int:
        v = self.values
        if self.kind == "fixed":
            x = v[0]
        elif self.kind == "uniform":
            x = rng.uniform(v[0], v[1])
        elif self.kind == "normal":
            x = rng.gauss(v[0], v[1])
        else:
            x = rng.lognormvariate(math.log(v[0]), v[1])
        return min(self.max_len, max(1, round(x)))


def text_of_length(tokenizer: PreTrainedTokenizerBase, n: int, rng: random.Random) -> str:
    """Text that the tokenizer turns into exactly `n` tokens (without special tokens)."""
    text = " ".join(rng.choice(_WORDS) for _ in range(n + 8))
    for _ in range(50):  # decoding then encoding again can merge or split a token at the edges
        ids = tokenizer(text, add_special_tokens=False).input_ids
        if len(ids) == n:
            return text
        text = tokenizer.decode(ids[:n]) if len(ids) > n else text + " " + rng.choice(_WORDS)
    raise ValueError(f"could not build a prompt of exactly {n} tokens")


def synthetic(tokenizer, n: int, input_len: LengthDist, output_len: LengthDist, rng: random.Random,
              chat: bool = False, token_ids: bool = False) -> list[BenchRequest]:  # fmt: skip
    requests = []
    for _ in range(n):
        k = input_len.sample(rng)
        requests.append(_request(tokenizer, k, output_len.sample(rng), rng, chat, token_ids))
    return requests


@dataclass(frozen=True)
class Phase:
    """A stretch of a phased workload: `DURATION/RATE/INPUT/OUTPUT`, e.g. `60/0.25/uniform:1000,2000/fixed:24`
    (seconds, requests per second, and two length distributions)."""

    duration_s: float
    rate: float
    input_len: LengthDist
    output_len: LengthDist

    @classmethod
    def parse_all(cls, spec: str) -> list[Phase]:
        """Phases separated by `;`."""
        phases = []
        for part in filter(None, (p.strip() for p in spec.split(";"))):
            fields = part.split("/")
            try:
                if len(fields) != 4:
                    raise ValueError("expected DURATION/RATE/INPUT/OUTPUT")
                phase = cls(float(fields[0]), float(fields[1]), LengthDist(fields[2]), LengthDist(fields[3]))
                if not (phase.duration_s > 0 and 0 < phase.rate < math.inf):
                    raise ValueError("duration and rate must be positive and finite")
            except ValueError as e:
                raise ValueError(f"not a phase: {part!r} ({e})") from None
            phases.append(phase)
        if not phases:
            raise ValueError("no phases given")
        return phases


def phased(tokenizer, phases: list[Phase], rng: random.Random, burstiness: float = 1.0, chat: bool = False,
           token_ids: bool = False) -> list[BenchRequest]:  # fmt: skip
    """Each phase's requests, arriving at its rate (gamma gaps, see `arrival_times`) for its duration, one
    phase after the other; arrival times are set."""
    requests, start = [], 0.0
    for i, phase in enumerate(phases):
        t = 0.0
        while True:
            t += rng.gammavariate(burstiness, 1.0 / (phase.rate * burstiness))
            if t >= phase.duration_s:
                break
            r = _request(tokenizer, phase.input_len.sample(rng), phase.output_len.sample(rng), rng, chat, token_ids)
            r.arrival_s, r.phase = start + t, i
            requests.append(r)
        start += phase.duration_s
    return requests


def shared_prefix(tokenizer, groups: int, per_group: int, prefix_len: int, suffix_len: LengthDist,
                  output_len: LengthDist, rng: random.Random, chat: bool = False) -> list[BenchRequest]:  # fmt: skip
    """`groups` system prompts of `prefix_len` tokens, each shared by `per_group` requests; shuffled."""
    requests = []
    for _ in range(groups):
        prefix = text_of_length(tokenizer, prefix_len, rng)
        for _ in range(per_group):
            k = suffix_len.sample(rng)
            suffix = text_of_length(tokenizer, k, rng)
            if chat:
                messages = [{"role": "system", "content": prefix}, {"role": "user", "content": suffix}]
                requests.append(BenchRequest(None, output_len.sample(rng), prefix_len + k, messages))
            else:
                prompt = prefix + "\n" + suffix
                count = len(tokenizer(prompt, add_special_tokens=False).input_ids)
                requests.append(BenchRequest(prompt, output_len.sample(rng), count))
    rng.shuffle(requests)
    return requests


def multi_turn(tokenizer, sessions: int, turns: int, input_len: LengthDist, output_len: LengthDist,
               rng: random.Random, system_len: int = 0, history: bool = True) -> list[BenchRequest]:  # fmt: skip
    """Chat sessions of `turns` user messages each, after a system prompt of `system_len` tokens that every
    session shares (none for 0); a turn's request is the conversation so far (the client fills in the real
    answers as they arrive), or only its own new message when not `history`. Returns the first turns; later
    ones are follow-ups."""
    system = [{"role": "system", "content": text_of_length(tokenizer, system_len, rng)}] if system_len else []
    firsts = []
    for s in range(sessions):
        session = []
        for t in range(turns):
            k = input_len.sample(rng)
            message = [*(system if t == 0 else []), {"role": "user", "content": text_of_length(tokenizer, k, rng)}]
            if not history:
                message = message[-1:]
            session.append(BenchRequest(None, output_len.sample(rng), k, message, session=s, turn=t,
                                        with_history=history))  # fmt: skip
        session[0].follow_ups = session[1:]
        firsts.append(session[0])
    return firsts


def sharegpt(path: Path, tokenizer, n: int, rng: random.Random, max_input: int = 4096, max_output: int = 1024,
             chat: bool = False) -> list[BenchRequest]:  # fmt: skip
    """ShareGPT format: a list of {"conversations": [{"from": "human"|"gpt", "value": ...}, ...]}. Each
    conversation's first human turn is a prompt; the length of the answer that follows sets max_tokens."""
    data: list[dict[str, Any]] = json.loads(Path(path).read_text())
    pairs = []
    for item in data:
        turns = item.get("conversations") or item.get("conversation") or []
        if len(turns) >= 2 and turns[0].get("from") == "human":
            pairs.append((turns[0]["value"], turns[1]["value"]))
    rng.shuffle(pairs)
    requests = []
    for prompt, answer in pairs:
        k = len(tokenizer(prompt, add_special_tokens=False).input_ids)
        out = len(tokenizer(answer, add_special_tokens=False).input_ids)
        if k < 4 or out < 4 or k > max_input or out > max_output:  # vLLM's filter: drop tiny and huge ones
            continue
        messages = [{"role": "user", "content": prompt}] if chat else None
        requests.append(BenchRequest(None if chat else prompt, out, k, messages))
        if len(requests) == n:
            break
    if not requests:
        raise ValueError(f"{path} has no usable ShareGPT conversations")
    return requests


def _request(tokenizer, k: int, out: int, rng: random.Random, chat: bool, token_ids: bool) -> BenchRequest:
    if token_ids:
        ids = [rng.randrange(100, min(tokenizer.vocab_size, 30000)) for _ in range(k)]
        return BenchRequest(ids, out, k)
    text = text_of_length(tokenizer, k, rng)
    if chat:
        return BenchRequest(None, out, k, [{"role": "user", "content": text}])
    return BenchRequest(text, out, k)


def arrival_times(n: int, rate: float, burstiness: float, rng: random.Random) -> list[float]:
    """n arrival times from 0: gaps drawn from a gamma distribution with mean 1/rate and shape `burstiness`
    (1: Poisson); rate inf: everything at 0 (the client's concurrency limit paces it)."""
    if burstiness <= 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    times, t = [], 0.0
    for _ in range(n):
        times.append(t)
        if math.isfinite(rate):
            t += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
    return times


def assign_arrivals(requests: list[BenchRequest], rate: float, burstiness: float, rng: random.Random) -> None:
    for r, t in zip(requests, arrival_times(len(requests), rate, burstiness, rng), strict=True):
        r.arrival_s = t
