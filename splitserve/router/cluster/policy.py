"""The router's SLO policies, as pure functions of what it measured, so that the planner's simulator runs the
very same ones.

- `prefills_locally`: conditional disaggregation (Dynamo's `isl_or_load`). A decode worker prefills a prompt
  itself when the part it lacks is short, or when the prefill pool's queue would make the prompt wait longer
  than computing it there and the decode worker runs nothing (no one's TPOT to hurt).
- `has_decode_room`: admission by TPOT. A decode worker whose measured step time is at the TPOT limit takes
  no new request (it would push every running one over): the request waits in the router's queue, where its
  wait counts against the decode pool.
- `RolePolicy`: which pool is the bottleneck, from windows of requests judged against the SLO, and so which
  way a worker should move. Each miss is laid at the door of the pool that caused it: a TPOT miss, or a
  TTFT miss spent mostly waiting for room on a decode worker, at the decode pool's; any other TTFT miss at
  the prefill pool's. A request counts once: when it ends, or as soon as it has plainly missed (`judge`),
  so that a pool falling behind shows before its slow requests finish. Prefill misses while the decode pool
  idles call for another prefill worker; decode misses while the prefill pool idles call for another decode
  worker. A verdict must hold for `confirm_windows` windows in a row (hysteresis) and switches are at least
  `dwell_s` apart. The decode pool never gives its last worker. The prefill pool may: a pool busy less than
  `idle_share` of the time does less than that share of one worker's work, which the decode workers then
  absorb (they prefill for themselves when no prefill worker is left); should TTFT suffer, its misses bring
  a worker back.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from splitserve.options import option
from splitserve.protocol import Role
from splitserve.slo import SLO

MIN_TOKENS_TO_JUDGE_TPOT = 8  # a running request's TPOT so far says something after this many tokens


@dataclass(frozen=True)
class LocalPrefill:
    """What decides whether a decode worker prefills a prompt itself."""

    max_tokens: int  # a prompt part this short is prefilled where it will be decoded (0: only under load)
    # With an SLO: a short prompt goes local on equal work too (it saves the transfer), and a prompt the pool
    # would start later than an idle decode worker goes local too. Without one the pool keeps both.
    conditional: bool = False


def local_prefill_threshold(tokens_per_s: float, tpot_s: float | None, configured: int | None) -> int:
    """The short-prompt threshold: the operator's, else the prompt tokens a decode worker computes in one
    TPOT budget (a local prefill that long stalls its batch by at most about one token's time), else 0."""
    if configured is not None:
        return configured
    if tpot_s is None or tokens_per_s <= 0:
        return 0
    return int(tokens_per_s * tpot_s)


def prefills_locally(
    suffix_tokens: int, local_pending_tokens: int, pool_tokens: float, rule: LocalPrefill, decoding: int = 0
) -> bool:
    """Whether a decode worker should compute a prompt's `suffix_tokens` (the part it does not hold cached).

    `local_pending_tokens`: prompt tokens it already has queued; `pool_tokens`: what the least busy prefill
    worker would have to compute first, this prompt included (inf: no prefill worker); `decoding`: requests
    the decode worker runs itself, decoding or prefilling, not those whose KV is still being prefilled
    elsewhere (a long prompt computed there would stall their tokens)."""
    if math.isinf(pool_tokens):
        return True
    local_tokens = suffix_tokens + local_pending_tokens
    less_work = local_tokens <= pool_tokens if rule.conditional else local_tokens < pool_tokens
    if suffix_tokens <= rule.max_tokens and less_work:
        return True
    # Under load: the pool has others' prompts to compute first, this worker nothing at all.
    return rule.conditional and not decoding and local_tokens < pool_tokens


def has_decode_room(step_s: float, tpot_s: float | None, running: int) -> bool:
    """Whether a decode worker may take another request under the TPOT limit: its measured decode step
    (`step_s`, 0: not measured) is within 90% of the limit, or it runs nothing (a stale figure must not keep
    an idle worker idle)."""
    return tpot_s is None or running == 0 or step_s < 0.9 * tpot_s


def judge(slo: SLO, now: float, created: float, first_token_at: float | None, num_tokens: int, waited_s: float,
          final: bool) -> tuple[bool, bool] | None:  # fmt: skip
    """Whether a request missed the SLO in prefill and in decode (see the module's docstring), or None when it
    cannot be told yet. `final`: it has ended; else it runs, and only a miss already plain is told.
    `waited_s`: how long it waited in the router's queue for room on a decode worker."""
    if first_token_at is None:
        if final or slo.ttft is None or now - created <= slo.ttft:
            return None
        return waited_s <= (now - created) / 2, waited_s > (now - created) / 2  # no first token, past the limit
    ttft = first_token_at - created
    tpot = (now - first_token_at) / (num_tokens - 1) if num_tokens > 1 else None
    missed = slo.missed(ttft, tpot, now - created)
    if not final and "ttft" not in missed and ("tpot" not in missed or num_tokens <= MIN_TOKENS_TO_JUDGE_TPOT):
        return None
    waited_for_decode = waited_s > ttft / 2
    ttft_missed = "ttft" in missed
    return ttft_missed and not waited_for_decode, "tpot" in missed or (ttft_missed and waited_for_decode)


@dataclass(frozen=True)
class PolicyOptions:
    window_s: float = option(  # requests judged in at least this long make one window...
        5.0,
        "with --slo: seconds of requests the role policy judges at a time (at least 4 requests; default "
        "{default:g}); a switch needs two windows in a row that agree",
        flag="--role-window",
    )
    miss_share: float = 0.1  # a window with this share of TTFT (or TPOT) misses says that pool is behind
    idle_share: float = 0.5  # a pool busy less than this share of the window can give a worker
    confirm_windows: int = 2  # the same verdict this many windows in a row before a switch
    dwell_s: float = option(
        30.0, "with --slo: at least this many seconds between two role switches (default {default:g})",
        flag="--role-dwell",
    )  # fmt: skip
    min_requests: int = 4  # ...and at least this many (under light traffic a window lasts until they finish)

    def window_over(self, elapsed_s: float, requests: int) -> bool:
        return elapsed_s >= self.window_s and requests >= self.min_requests


@dataclass(frozen=True)
class Window:
    """What the router saw in one window."""

    requests: int  # finished, with at least one token
    prefill_misses: int  # requests whose TTFT missed while they were being prefilled (or queued for it)
    decode_misses: int  # requests whose TPOT missed, or whose TTFT went on waiting for a decode worker's room
    prefill_busy: float  # share of the window the prefill pool had work (0 with no prefill worker)
    decode_busy: float
    num_prefill: int  # workers in each pool (not counting one that is switching)
    num_decode: int


@dataclass
class WindowCounts:
    """What the SLO loop has counted in the window under way (the router's and the simulator's alike)."""

    start: float
    requests: int = 0
    prefill_misses: int = 0
    decode_misses: int = 0
    ticks: int = 0  # watch-loop ticks: the busy-tick counts of each worker are out of these

    def count(self, verdict: tuple[bool, bool]) -> None:
        """One request judged (`judge`'s verdict)."""
        self.requests += 1
        self.prefill_misses += verdict[0]
        self.decode_misses += verdict[1]

    def window(self, prefill_busy_ticks: list[int], decode_busy_ticks: list[int]) -> Window:
        """The window, given each pool's workers' busy ticks (a worker per entry)."""

        def busy(pool: list[int]) -> float:
            return sum(pool) / len(pool) / max(self.ticks, 1) if pool else 0.0

        return Window(self.requests, self.prefill_misses, self.decode_misses, busy(prefill_busy_ticks),
                      busy(decode_busy_ticks), len(prefill_busy_ticks), len(decode_busy_ticks))  # fmt: skip


class Verdict(enum.Enum):
    TO_PREFILL = "to_prefill"  # the prefill pool is the bottleneck: a decode worker should move
    TO_DECODE = "to_decode"


@dataclass(frozen=True)
class Decision:
    source: Role  # the pool a worker leaves
    target: Role
    reason: str


class RolePolicy:
    def __init__(self, options: PolicyOptions | None = None):
        self.options = options or PolicyOptions()
        self._verdict: Verdict | None = None
        self._streak = 0
        self._last_switch = -math.inf
        self.last_reason = ""  # what the last window said, for /health
        self.last_behind: Role | None = None  # the pool it said is behind (a pool to grow, where there is room)

    def behind(self, w: Window) -> Role | None:
        """The pool the window's misses are laid at, whether or not the other pool can give a worker."""
        o = self.options
        if w.requests < o.min_requests:
            return None
        pre, dec = w.prefill_misses / w.requests, w.decode_misses / w.requests
        if pre >= o.miss_share and pre > dec:
            return Role.PREFILL
        return Role.DECODE if dec >= o.miss_share and dec >= pre else None

    def verdict(self, w: Window) -> tuple[Verdict | None, str]:
        """Which pool the window says is behind, and whether the other can give a worker (with why)."""
        o = self.options
        if w.requests < o.min_requests:
            return None, f"{w.requests} requests finished: too few to judge"
        pre, dec = w.prefill_misses / w.requests, w.decode_misses / w.requests
        misses = f"of {w.requests} requests, {pre:.0%} missed the SLO in prefill and {dec:.0%} in decode"
        behind = self.behind(w)
        if behind is Role.PREFILL:
            if w.num_decode > 1 and (w.num_prefill == 0 or w.decode_busy < o.idle_share):
                return Verdict.TO_PREFILL, f"{misses}; decode pool busy {w.decode_busy:.0%} of the window"
            return None, f"{misses}; the decode pool cannot give a worker"
        if behind is Role.DECODE:
            if w.num_prefill and w.prefill_busy < o.idle_share:
                return Verdict.TO_DECODE, f"{misses}; prefill pool busy {w.prefill_busy:.0%} of the window"
            return None, f"{misses}; the prefill pool cannot give a worker"
        return None, misses

    def decide(self, w: Window, now: float) -> Decision | None:
        """Judge one window; a decision once a verdict has held long enough and the last switch is old."""
        verdict, why = self.verdict(w)
        self.last_reason, self.last_behind = why, self.behind(w)
        self._streak = self._streak + 1 if verdict is not None and verdict is self._verdict else int(bool(verdict))
        self._verdict = verdict
        if verdict is None or self._streak < self.options.confirm_windows:
            return None
        if now - self._last_switch < self.options.dwell_s:
            return None
        self._last_switch, self._streak, self._verdict = now, 0, None
        if verdict is Verdict.TO_PREFILL:
            return Decision(Role.DECODE, Role.PREFILL, why)
        return Decision(Role.PREFILL, Role.DECODE, why)
