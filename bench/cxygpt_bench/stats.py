"""Statistics of a load run from per-request records (pure): percentiles, rates, status classes."""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

# status classes reported on their own; everything else non-2xx is "other"
TRACKED = (413, 429, 503)
# a request that never got an HTTP status (connection refused/reset, client timeout)
NO_STATUS = 0


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100) by linear interpolation between closest ranks (numpy's default);
    None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(values: list[float]) -> dict:
    """avg, p50, p95, p99, min, max of a list (None each when empty)."""
    if not values:
        return {"n": 0, "avg": None, "p50": None, "p95": None, "p99": None, "min": None, "max": None}
    ordered = sorted(values)
    return {"n": len(ordered), "avg": sum(ordered) / len(ordered), "p50": percentile(ordered, 50),
            "p95": percentile(ordered, 95), "p99": percentile(ordered, 99), "min": ordered[0], "max": ordered[-1]}


@dataclass
class Record:
    """One request: HTTP status (0: none), seconds to the first byte/event and to the end, output tokens
    (usage when the answer carried it, else streamed events), streamed events, whether Retry-After was sent,
    and when it ended (seconds since the run started)."""
    status: int
    ttft: float | None
    total: float
    tokens: int = 0
    chunks: int = 0
    retry_after: bool = False
    end: float = 0.0


@dataclass
class Report:
    records: list[Record] = field(default_factory=list)
    elapsed_s: float = 0.0
    dropped: int = 0  # open-loop arrivals not sent because the in-flight cap was reached
    window: tuple[float, float] | None = None  # steady-state part of the run for window_ok_rps

    def window_ok_rps(self) -> float | None:
        """Successful answers that ended inside `window`, per second of it: the served rate in steady state,
        without the start (nothing finished yet) or the drain after the last arrival."""
        if not self.window or self.window[1] <= self.window[0]:
            return None
        start, stop = self.window
        return sum(1 for r in self.records if 200 <= r.status < 300 and start <= r.end <= stop) / (stop - start)

    def to_dict(self) -> dict:
        ok = [r for r in self.records if 200 <= r.status < 300]
        codes = Counter(r.status for r in self.records)
        n = len(self.records)
        elapsed = self.elapsed_s or float("nan")
        errors = {str(c): codes.get(c, 0) for c in TRACKED}
        errors["other"] = sum(v for c, v in codes.items() if not 200 <= c < 300 and c not in TRACKED)
        rejected = [r for r in self.records if r.status in (429, 503)]
        out_tokens = sum(r.tokens for r in ok)
        chunks = sum(r.chunks for r in ok)
        ms = lambda xs: {k: (v * 1000 if isinstance(v, float) and k != "n" else v) for k, v in summarize(xs).items()}
        return {
            "requests": n, "ok": len(ok), "elapsed_s": self.elapsed_s, "dropped": self.dropped,
            "window_ok_rps": self.window_ok_rps(),
            "rps": n / elapsed, "ok_rps": len(ok) / elapsed,
            "output_tokens": out_tokens, "output_tokens_per_s": out_tokens / elapsed,
            "chunks": chunks, "chunks_per_s": chunks / elapsed,
            "ttft_ms": ms([r.ttft for r in ok if r.ttft is not None]),
            "latency_ms": ms([r.total for r in ok]),
            "errors": errors, "error_rates": {k: (v / n if n else 0.0) for k, v in errors.items()},
            "status_counts": {str(c): v for c, v in sorted(codes.items())},
            "rejection_ms": ms([r.total for r in rejected]),
            "rejections_with_retry_after": sum(1 for r in rejected if r.retry_after),
        }


def fmt_ms(v: float | None) -> str:
    return "-" if v is None else (f"{v:.3f}" if v < 1 else f"{v:.1f}" if v < 1000 else f"{v:.0f}")


def render(d: dict) -> str:
    """The human report of Report.to_dict()."""
    lines = [f"requests {d['requests']}  ok {d['ok']}  in {d['elapsed_s']:.2f} s  "
             f"rps {d['rps']:.1f}  output tokens/s {d['output_tokens_per_s']:.1f}"
             + (f"  chunks/s {d['chunks_per_s']:.0f}" if d["chunks"] else "")
             + (f"  dropped (in-flight cap) {d['dropped']}" if d["dropped"] else "")]
    for name, key in (("TTFT", "ttft_ms"), ("latency", "latency_ms")):
        s = d[key]
        lines.append(f"{name:8s} ms  avg {fmt_ms(s['avg'])}  p50 {fmt_ms(s['p50'])}  p95 {fmt_ms(s['p95'])}  "
                     f"p99 {fmt_ms(s['p99'])}  max {fmt_ms(s['max'])}")
    e, r = d["errors"], d["error_rates"]
    lines.append("errors   " + "  ".join(f"{k} {e[k]} ({r[k]:.1%})" for k in ("413", "429", "503", "other")))
    if d["rejection_ms"]["n"]:
        s = d["rejection_ms"]
        lines.append(f"rejected ms  p50 {fmt_ms(s['p50'])}  p95 {fmt_ms(s['p95'])}  max {fmt_ms(s['max'])}  "
                     f"with Retry-After {d['rejections_with_retry_after']}/{s['n']}")
    return "\n".join(lines)
