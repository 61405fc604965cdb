"""The fleet benchmark's pure parts: the ideal prefix-cache hit rate, load balance, a point's summary, the throughput
at an SLO, the goals of issue 26 and the report."""
from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from .shapes import SHAPES, SHARING
from .stats import percentile

INF = math.inf


# --- the ideal hit rate -----------------------------------------------------------------------------------

class PromptTokens:
    """Token ids of prompts as an engine renders and tokenizes them, given its `encode(text)` and
    `render(messages, add_generation_prompt)` (the simulator's: ChatML and Qwen3's tokenizer). Each message is
    tokenized once: ChatML puts a special token at both ends of every message and special tokens split the text
    before BPE, so a chat prompt's ids are its messages' ids in order; a completion's prompt is encoded whole."""

    def __init__(self, encode: Callable[[str], list[int]], render: Callable[..., str]):
        self.encode, self.render = encode, render
        self.cache: dict[bytes, list[int]] = {}
        self.tail = encode(render([{"role": "user", "content": ""}], add_generation_prompt=True)
                           [len(render([{"role": "user", "content": ""}], add_generation_prompt=False)):])

    def _message(self, m: dict) -> list[int]:
        key = hashlib.blake2b(f"{m['role']}\0{m['content']}".encode(), digest_size=16).digest()
        ids = self.cache.get(key)
        if ids is None:
            ids = self.cache[key] = self.encode(self.render([m], add_generation_prompt=False))
        return ids

    def ids(self, messages: Sequence[dict]) -> list[int]:
        out: list[int] = []
        for m in messages:
            out += self._message(m)
        return out + self.tail

    def of(self, fields: dict) -> list[int]:
        """A request's prompt ids from its `messages` or its `prompt`."""
        return self.ids(fields["messages"]) if "messages" in fields else self.encode(fields["prompt"])


def block_hashes(token_ids: Sequence[int], block_size: int) -> list[int]:
    """Chained hashes of the full blocks, as the simulator's prefix cache keys them: equal means equal prefix."""
    hashes, parent = [], 0
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash((parent, tuple(token_ids[start:start + block_size])))
        hashes.append(parent)
    return hashes


def ideal_hits(prompts: Iterable[Sequence[int]], block_size: int = 16, seen: set[int] | None = None) -> tuple[int, int]:
    """(hit tokens, queried tokens) of the prompts, in order, against one prefix cache that never evicts, counted
    as the simulator counts vllm:prefix_cache_hits/queries: every prompt token is queried, the longest cached run of
    full blocks is hit, never the block holding the last token (it must be computed); every full block of a prompt
    is cached after it. `seen`: the cache's blocks before (the earlier points of a sweep), updated."""
    seen = set() if seen is None else seen
    hits = queries = 0
    for ids in prompts:
        hashes = block_hashes(ids, block_size)
        queries += len(ids)
        for h in hashes[:(len(ids) - 1) // block_size]:
            if h not in seen:
                break
            hits += block_size
        seen.update(hashes)
    return hits, queries


# --- load balance -----------------------------------------------------------------------------------------

def balance(samples: Sequence[Sequence[float]]) -> dict:
    """From samples of requests in flight (running + waiting) per replica: each replica's mean and peak, and the
    busiest replica's mean over the mean of all (1.0 = even)."""
    if not samples:
        return {"samples": 0, "mean": [], "peak": [], "max_over_mean": None}
    n = len(samples[0])
    means = [sum(s[i] for s in samples) / len(samples) for i in range(n)]
    peaks = [max(s[i] for s in samples) for i in range(n)]
    overall = sum(means) / n
    return {"samples": len(samples), "mean": means, "peak": peaks,
            "max_over_mean": max(means) / overall if overall > 0 else None}


# --- a point ----------------------------------------------------------------------------------------------

@dataclass
class Result:
    """One request as the client saw it."""
    sent: float               # seconds from the start of the point
    scheduled: float = 0.0
    status: str = "ok"        # ok | http-<code> | broken (no [DONE] or an error event) | timeout | connection | cut
    ttft: float | None = None  # to the first content piece
    end: float | None = None   # seconds from the start of the point
    tokens: int = 0
    conversation: int = -1
    turn: int = 0
    index: int = -1
    text: str = field(default="", repr=False)


CUT = "cut"  # still waiting or streaming when the point was stopped: not an error of the front


def percentile_bound(values: Sequence[tuple[float, bool]], q: float) -> tuple[float | None, bool]:
    """The q-th percentile of (value, is a lower bound) pairs, and whether it is exact: it is not when a lower bound
    is at or below the ranks it is interpolated from (the true values there may be higher)."""
    if not values:
        return None, True
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    hi = min(math.floor(pos) + 1, len(ordered) - 1)
    return percentile([v for v, _ in ordered], q), not any(bound for _, bound in ordered[:hi + 1])


def counter_deltas(before: Sequence[dict], after: Sequence[dict], key: str) -> list[float]:
    return [a.get(key, 0.0) - b.get(key, 0.0) for a, b in zip(after, before)]


def bracket(samples: Sequence[tuple[float, Sequence[float], Sequence[dict]]], start: float,
            end: float) -> tuple[Sequence[dict], Sequence[dict]]:
    """The replicas' counters read last at or before `start` (else first) and last at or before `end`: what
    they counted over a stage. samples: (time, in flight per replica, metrics per replica), in time order."""
    if not samples:
        return (), ()
    before = [m for t, _, m in samples if t <= start][-1:] or [samples[0][2]]
    after = [m for t, _, m in samples if t <= end][-1:] or [samples[0][2]]
    return before[0], after[0]


def summarize(results: Sequence[Result], *, start: float, end: float, stopped_at: float, slo_s: float,
              samples: Sequence[tuple[float, Sequence[float], Sequence[dict]]] = ()) -> dict:
    """A stage of a sweep from its requests: TTFT percentiles of those sent in [start, end) (one stopped before its
    first token counts with the time it had waited, a lower bound above the SLO when the sweep ran SLO seconds
    past the stage), goodput (those that ended without error with TTFT within the SLO, per second of the stage),
    output tokens/s and served requests/s (answers that ended in the stage), errors (of the requests sent in it;
    a stopped one is not an error), the replicas' prefix-cache hit rate and their balance over the stage."""
    span = end - start
    window = [r for r in results if start <= r.sent < end]
    ttft = [(r.ttft, False) for r in window if r.ttft is not None and r.status in ("ok", CUT)]
    ttft += [(stopped_at - r.sent, True) for r in window if r.ttft is None and r.status == CUT]
    p50, p50_exact = percentile_bound(ttft, 50)
    p90, p90_exact = percentile_bound(ttft, 90)
    p99, p99_exact = percentile_bound(ttft, 99)
    errors: dict[str, int] = {}
    for r in window:
        if r.status not in ("ok", CUT):
            errors[r.status] = errors.get(r.status, 0) + 1
    ended = [r for r in results if r.status == "ok" and r.end is not None and start <= r.end <= end]
    before, after = bracket(samples, start, end)
    queries = sum(counter_deltas(before, after, "vllm:prefix_cache_queries_total"))
    hits = sum(counter_deltas(before, after, "vllm:prefix_cache_hits_total"))
    bal = balance([s for t, s, _ in samples if start <= t <= end])
    ms = lambda v: None if v is None else v * 1000
    return {
        "sent": len(window), "ok": sum(r.status == "ok" for r in window),
        "errors": sum(errors.values()), "errors_by_kind": errors, "cut": sum(r.status == CUT for r in window),
        "censored": sum(bound for _, bound in ttft),
        "ttft_p50_ms": ms(p50), "ttft_p90_ms": ms(p90), "ttft_p99_ms": ms(p99),
        "ttft_exact": {"p50": p50_exact, "p90": p90_exact, "p99": p99_exact},
        "goodput_rps": sum(1 for r in window if r.status == "ok" and r.ttft is not None and r.ttft <= slo_s) / span,
        "ok_rps": len(ended) / span, "output_tokens_per_s": sum(r.tokens for r in ended) / span,
        "late_sends": sum(1 for r in window if r.sent - r.scheduled > 0.05),
        "hit_rate": hits / queries if queries else None, "prefix_queries": queries, "prefix_hits": hits,
        "preemptions": sum(counter_deltas(before, after, "vllm:num_preemptions_total")),
        "served_per_replica": [round(x) for x in counter_deltas(before, after, "vllm:request_success_total")],
        "in_flight_mean": [round(x, 2) for x in bal["mean"]], "in_flight_peak": bal["peak"],
        "max_over_mean": bal["max_over_mean"], "samples": bal["samples"],
    }


def cpu_per_request(points: Sequence[dict]) -> float | None:
    """A front's CPU ms per request over its sweep: its stages' CPU over the requests sent in them."""
    sent = sum(p["sent"] for p in points if p["front_cpu_ms_per_request"] is not None)
    return sum(p["front_cpu_ms_per_request"] * p["sent"] for p in points
               if p["front_cpu_ms_per_request"] is not None) / sent if sent else None


def passes(point: dict, slo_ms: float) -> bool:
    """Within the SLO: p90 TTFT at most the SLO and no error."""
    return point["errors"] == 0 and point["ttft_p90_ms"] is not None and point["ttft_p90_ms"] <= slo_ms


# --- throughput at the SLO --------------------------------------------------------------------------------

def throughput_at_slo(points: Sequence[dict], slo_ms: float) -> dict:
    """The highest offered rate (req/s) at which p90 TTFT stays within the SLO and nothing fails, from points of
    a sweep (any order; each with offered_rps, ttft_p90_ms, errors): the rates up to the first point that misses
    count, as a sweep stops there. `grid`: the highest such offered rate; `value`: between it and the first miss,
    where p90 TTFT crosses the SLO on the line through the two points (the grid rate when the miss was an error);
    [lo, hi]: what is known of the value (a front that met it at every rate: [the highest, inf); at none:
    [0, the lowest))."""
    ordered = sorted(points, key=lambda p: p["offered_rps"])
    last = miss = None
    for p in ordered:
        if not passes(p, slo_ms):
            miss = p
            break
        last = p
    out = {"grid": last and last["offered_rps"], "first_miss": miss and miss["offered_rps"],
           "why": None if miss is None else "errors" if miss["errors"] else "p90"}
    if last is None:
        return {**out, "value": None, "lo": 0.0, "hi": miss["offered_rps"] if miss else 0.0}
    if miss is None:
        return {**out, "value": last["offered_rps"], "lo": last["offered_rps"], "hi": INF}
    r0, p0 = last["offered_rps"], last["ttft_p90_ms"]
    value = r0
    if not miss["errors"] and miss["ttft_p90_ms"] is not None and miss["ttft_p90_ms"] > p0:
        value = r0 + (slo_ms - p0) / (miss["ttft_p90_ms"] - p0) * (miss["offered_rps"] - r0)
    return {**out, "value": value, "lo": value, "hi": value}


def exact(value: float) -> dict:
    """A throughput known exactly (the perfect router's, computed)."""
    return {"value": value, "lo": value, "hi": value, "grid": value, "first_miss": None, "why": None}


def _div(a: float, b: float) -> float:
    if b == 0:
        return INF if a > 0 else 0.0
    return 0.0 if a == INF and b == INF else a / b


def ratio(a: dict, b: dict) -> tuple[float, float]:
    """What is known of a / b from what is known of each: (lowest, highest)."""
    return _div(a["lo"], b["hi"]), _div(a["hi"], b["lo"])


def best(tas: Sequence[dict]) -> dict | None:
    """The best of several fronts' throughputs (their known ranges' maxima)."""
    if not tas:
        return None
    return {"lo": max(t["lo"] for t in tas), "hi": max(t["hi"] for t in tas)}


def fmt_range(lo: float, hi: float, unit: str = "×") -> str:
    if lo == hi:
        return f"{lo:.2f}{unit}"
    if hi == INF:
        return f"≥ {lo:.2f}{unit}"
    if lo == 0:
        return f"< {hi:.2f}{unit}"
    return f"{lo:.2f}–{hi:.2f}{unit}"


# --- the goals of issue 26 --------------------------------------------------------------------------------

PREFIX, LEAST, RANDOM, TWO = "gw-prefix", "gw-least-load", "service", "gw-prefix-x2"
PERFECT = "perfect"
VLLM_ROUTER = ("vr-cache_aware", "vr-consistent_hash", "vr-power_of_two")
VS_RANDOM, VS_LEAST, VS_BEST_VLLM_ROUTER, OF_PERFECT = 2.0, 1.3, 1.2, 0.9   # shapes that share prefixes
UNSHARED_VS_LEAST = 0.95
TWO_OF_ONE = 0.9


def judge(throughput: dict[str, dict[str, dict]], errors: dict[str, dict[str, int]],
          cpu_ms: dict[str, dict[str, float]] | None = None) -> list[dict]:
    """The goals per shape, from each front's throughput at the SLO (shape -> front -> throughput_at_slo, the
    perfect router's under "perfect") and errors over its sweep (shape -> front -> count): a row per goal with
    what was measured and met (None when a front it needs was not measured or the measurement cannot tell).
    `cpu_ms` (shape -> front -> the gateway's CPU ms per request) adds the CPU goal's rows, open: it compares a
    revision with the one before in the same run (bench/ab_callgrind.py for G1/G2), and this run is the before."""
    rows = []
    for shape in SHAPES:
        tas = throughput.get(shape)
        if not tas:
            continue

        def row(goal: str, target: float, a: str, others: Sequence[str], tas=tas, shape=shape):
            b = best([tas[f] for f in others if f in tas])
            if a not in tas or b is None:
                rows.append({"shape": shape, "goal": goal, "target": f"≥ {target:g}×", "measured": "-", "met": None})
                return
            lo, hi = ratio(tas[a], b)
            met = True if lo >= target - 1e-9 else False if hi < target - 1e-9 else None
            rows.append({"shape": shape, "goal": goal, "target": f"≥ {target:g}×", "measured": fmt_range(lo, hi),
                         "met": met})

        if shape in SHARING:
            row("prefix / random (a Service)", VS_RANDOM, PREFIX, [RANDOM])
            row("prefix / least-load", VS_LEAST, PREFIX, [LEAST])
            row("prefix / best vllm-router policy", VS_BEST_VLLM_ROUTER, PREFIX, VLLM_ROUTER)
            row("prefix / perfect router", OF_PERFECT, PREFIX, [PERFECT])
        else:
            row("prefix / least-load", UNSHARED_VS_LEAST, PREFIX, [LEAST])
        row("two gateways / one", TWO_OF_ONE, TWO, [PREFIX])
        got = {f: n for f, n in (errors.get(shape) or {}).items() if f.startswith("gw-")}
        rows.append({"shape": shape, "goal": "errors through our gateways", "target": "0",
                     "measured": str(sum(got.values())) if got else "-",
                     "met": (sum(got.values()) == 0) if got else None})
        cpu = (cpu_ms or {}).get(shape, {}).get(PREFIX)
        if cpu is not None:
            rows.append({"shape": shape, "goal": "the gateway's CPU per request (prefix)", "target": "≤ before",
                         "measured": f"{cpu:.2f} ms", "met": None})
    return rows


# --- the report -------------------------------------------------------------------------------------------

def fmt(x, f="{:.0f}"):
    return "-" if x is None else f.format(x)


def pct(x):
    return "-" if x is None else f"{x:.0%}"


def _ms(p: dict, q: str) -> str:
    v = p[f"ttft_{q}_ms"]
    return "-" if v is None else f"{v:.0f}" if p["ttft_exact"][q] else f"> {v:.0f}"


def _tas(t: dict | None) -> str:
    if t is None:
        return "-"
    if t["lo"] == t["hi"]:
        return f"{t['value']:.1f}"
    return f"≥ {t['lo']:.1f}" if t["hi"] == INF else f"< {t['hi']:.1f}"


MID = 0.75  # the sweep's point whose p90 the summary shows


def render(r: dict, begin: str, end: str) -> str:
    """The BENCHMARKS.md section of a run's results."""
    slo_ms = r["slo_ttft_s"] * 1000
    shapes, fronts = [s for s in r["shapes"] if s in r["points"]], r["fronts"]
    lines = [begin, "", f"Run {r['started']}–{r['finished']} on {r['machine']}, revision {r.get('revision') or '?'}, "
             f"vllm-router {r.get('vllm_router', '?') or 'not installed'}; "
             f"machine load: {r['load_before']} before, {r['load_after']} after, 1-minute load average "
             f"{r['load_during']} at the start of each front's sweep. Command:", "", f"```sh\n{r['command']}\n```", "",
             f"Raw results: `{r['results_file']}`. SLO: p90 TTFT ≤ {r['slo_ttft_s']:g} s and no error. Rates: "
             + ", ".join(f"{x:g}" for x in r["grid"]) + f" × the perfect router's capacity per shape, stages of "
             f"{r['duration_s']:g} s back to back after {r['lead_s']:g} s at the first rate (not measured); a stage is "
             f"judged {r['grace_s']:g} s after its last arrival and a front's sweep stops at its first stage that "
             "misses the SLO" + (" (`--full-sweep`: not stopped)" if r.get("full_sweep") else "") + "."]
    if r["notes"]:
        lines.append("")
    lines += [f"- note: {n}" for n in r["notes"]]
    lines += ["", "### Throughput at the SLO (req/s; in brackets: × the perfect router's)", "",
              "| front | " + " | ".join(shapes) + " |", "|---|" + "---|" * len(shapes)]
    for front in [PERFECT] + fronts:
        cells = []
        for s in shapes:
            t = r["throughput"][s].get(front)
            perfect = r["throughput"][s][PERFECT]["value"]
            cells.append("-" if t is None else f"{_tas(t)} ({fmt_range(t['lo'] / perfect, t['hi'] / perfect)})")
        lines.append(f"| {front} | " + " | ".join(cells) + " |")
    lines += ["", f"p90 TTFT (ms) at {MID:g} × the perfect router's capacity (or the rate whose stage missed the SLO "
              "first, below it) · the front's CPU per request over its sweep (ms: a gateway's or vllm-router's "
              "processes, or the Service's relay):", "", "| front | " + " | ".join(shapes) + " |",
              "|---|" + "---|" * len(shapes)]
    for front in fronts:
        cells = []
        for s in shapes:
            points = r["points"][s].get(front, [])
            mid = [p for p in points if abs(p["rate_x"] - MID) < 1e-9]
            cpu = cpu_per_request(points)
            cell = _ms(mid[0], "p90") if mid else f"missed at {points[-1]['rate_x']:g}×" if points else "-"
            cells.append(cell + ("" if cpu is None else f" · {cpu:.2f} ms"))
        lines.append(f"| {front} | " + " | ".join(cells) + " |")
    lines += ["", "### Goals of issue 26", "", "| shape | goal | target | measured | met |", "|---|---|---|---|---|"]
    for g in r["goals"]:
        met = "yes" if g["met"] else "no" if g["met"] is not None else "n/a"
        lines.append(f"| {g['shape']} | {g['goal']} | {g['target']} | {g['measured']} | {met} |")
    for s in shapes:
        cap = r["capacity"][s]
        lines += ["", f"### Points: {s}", "", (
            f"Perfect router: {cap['fleet_rps']:.2f} req/s (given)" if cap.get("given") else
            f"Perfect router: one replica with a cache that never evicts served {cap['replica_rps']:.2f} req/s "
            f"({cap['replica_output_tokens_per_s']:.0f} output tokens/s, mean prompt {fmt(cap['prompt_tokens_mean'])} "
            f"tokens, hit rate {pct(cap['hit_rate'])}), {cap['users']} closed-loop users, {cap['duration_s']:g} s; "
            f"× {r['replicas']} = **{cap['fleet_rps']:.2f} req/s**.")
            + f" Mean prompt in the points: {fmt(r['prompt_tokens_mean'].get(s))} tokens.", "",
            "| rate × perfect (req/s) | front | TTFT p50 / p90 / p99 (ms) | within SLO | goodput req/s | "
            "output tok/s | hit rate (ideal) | in flight per replica, mean (max/mean) | errors / cut | "
            "CPU cores: client / sims / front | front CPU ms/req | load avg |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for x in r["grid"]:
            for front in fronts:
                for p in r["points"][s].get(front, []):
                    if abs(p["rate_x"] - x) > 1e-9:
                        continue
                    c = p["cpu_cores"]
                    lines.append(
                        f"| {x:g} ({p['offered_rps']:.1f}) | {front} | {_ms(p, 'p50')} / {_ms(p, 'p90')} / "
                        f"{_ms(p, 'p99')} | {'yes' if passes(p, slo_ms) else 'no'} | {p['goodput_rps']:.2f} | "
                        f"{p['output_tokens_per_s']:.0f} | {pct(p['hit_rate'])} ({pct(p.get('ideal_hit_rate'))}) | "
                        f"{' '.join(f'{v:.1f}' for v in p['in_flight_mean'])} ({fmt(p['max_over_mean'], '{:.2f}')}) | "
                        f"{p['errors']} / {p['cut']} | {c['client']} / {c['sims_total']} / {fmt(c['front'], '{}')} | "
                        f"{fmt(p.get('front_cpu_ms_per_request'), '{:.2f}')} | {p['loadavg']:.1f} |")
    lines += ["", end]
    return "\n".join(lines)
