"""The fleet's charts from the gateways' /metrics: per-model rates and quantiles between scrapes, the last 15
minutes."""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

WINDOW_S = 900             # what the charts show: the last 15 minutes
SMOOTHING_S = 15.0         # rates and quantiles of each point are over at least this long (a few scrapes)
MAX_MODELS = 64            # model labels kept per scrape (a chart of more is unreadable); the rest are dropped, counted
CHARTS = ("rps", "ttft_p50", "ttft_p95", "queue", "tps")
REQUESTS, TTFT, OUTPUT_TOKENS, QUEUE = ("cxygpt_gateway_requests", "cxygpt_gateway_ttft_seconds",
                                        "cxygpt_gateway_completion_tokens", "cxygpt_gateway_queue_depth")


@dataclass
class ModelCounters:
    """One model's counters and gauges in one gateway replica's scrape."""
    requests: float = 0.0
    output_tokens: float = 0.0
    queue: float = 0.0
    ttft_buckets: dict[float, float] = field(default_factory=dict)   # upper bound → cumulative count


@dataclass
class Scrape:
    models: dict[str, ModelCounters]
    dropped_models: int = 0


def parse_scrape(text: str, max_models: int = MAX_MODELS) -> Scrape:
    """The per-model counters of one /metrics answer (Prometheus text format); other metrics are ignored."""
    models: dict[str, ModelCounters] = {}
    dropped: set[str] = set()

    def counters(labels: dict) -> ModelCounters | None:
        model = labels.get("model")
        if model is None:
            return None
        if model not in models:
            if len(models) >= max_models:
                dropped.add(model)
                return None
            models[model] = ModelCounters()
        return models[model]

    wanted = {REQUESTS + "_total", OUTPUT_TOKENS + "_total", QUEUE, TTFT + "_bucket"}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:  # by the sample's name: the family's depends on the TYPE line's spelling
            if sample.name not in wanted:
                continue
            c = counters(sample.labels)
            if c is None:
                continue
            if sample.name == REQUESTS + "_total":
                c.requests += sample.value
            elif sample.name == OUTPUT_TOKENS + "_total":
                c.output_tokens += sample.value
            elif sample.name == QUEUE:
                c.queue += sample.value
            elif sample.name == TTFT + "_bucket":
                c.ttft_buckets[float(sample.labels["le"])] = sample.value
    return Scrape(models, len(dropped))


def _increase(previous: float, current: float) -> float:
    """A counter's increase between two reads; a smaller value is a restart from zero (as Prometheus counts it)."""
    return current if current < previous else current - previous


@dataclass
class Interval:
    """What one model did between two scrape rounds, summed over the gateway replicas."""
    seconds: float
    requests: float = 0.0
    output_tokens: float = 0.0
    queue: float = 0.0
    ttft: dict[float, float] = field(default_factory=dict)   # upper bound → observations in the interval (cumulative)


def intervals(previous: dict[str, Scrape], current: dict[str, Scrape], seconds: float) -> dict[str, Interval]:
    """Each model's increase between two rounds of scrapes (replica → its scrape). A replica seen for the first
    time contributes its gauges only: its counters have no earlier value to start from."""
    out: dict[str, Interval] = {}
    for replica, scrape in current.items():
        before = previous.get(replica)
        for model, now in scrape.models.items():
            i = out.setdefault(model, Interval(seconds))
            i.queue += now.queue
            if before is None:
                continue
            was = before.models.get(model, ModelCounters())
            i.requests += _increase(was.requests, now.requests)
            i.output_tokens += _increase(was.output_tokens, now.output_tokens)
            for le, count in now.ttft_buckets.items():
                i.ttft[le] = i.ttft.get(le, 0.0) + _increase(was.ttft_buckets.get(le, 0.0), count)
    return out


def quantile(q: float, buckets: dict[float, float]) -> float | None:
    """histogram_quantile() of Prometheus on cumulative bucket counts: linear within the bucket; in the +Inf
    bucket, the highest finite bound. None with no observations, or no finite bound to give."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    total = buckets[bounds[-1]]
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower_bound if bound != bounds[0] else None
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound


class SeriesStore:
    """Scrape rounds of the last `window_s`, bounded: one entry per round, at most `max_models` models each."""

    def __init__(self, interval_s: float, window_s: float = WINDOW_S):
        self.interval_s = interval_s
        self.rounds: deque[tuple[float, dict[str, Interval]]] = deque(maxlen=max(2, math.ceil(window_s / interval_s)))
        self._last: tuple[float, dict[str, Scrape]] | None = None

    def add_round(self, at: float, scrapes: dict[str, Scrape]) -> None:
        """One round of scrapes taken at `at` (seconds since the epoch), replica → scrape."""
        if self._last is not None and at > self._last[0]:
            self.rounds.append((at, intervals(self._last[1], scrapes, at - self._last[0])))
        self._last = (at, scrapes)

    def export(self, smoothing_s: float = SMOOTHING_S) -> dict:
        """The charts' data: one time axis and, per model, a value per time for each chart (None where the model
        did nothing to measure). Rates and quantiles of a point cover the rounds of the last `smoothing_s`."""
        rounds = list(self.rounds)
        models = sorted({m for _, by_model in rounds for m in by_model})
        times = [at for at, _ in rounds]
        per = max(1, round(smoothing_s / self.interval_s))
        out: dict[str, dict[str, list]] = {m: {c: [] for c in CHARTS} for m in models}
        for index in range(len(rounds)):
            span = rounds[max(0, index - per + 1): index + 1]
            for model in models:
                parts = [by_model[model] for _, by_model in span if model in by_model]
                current = rounds[index][1].get(model)
                series = out[model]
                if current is None:
                    for chart in CHARTS:
                        series[chart].append(None)
                    continue
                seconds = sum(p.seconds for p in parts)
                buckets: dict[float, float] = {}
                for p in parts:
                    for le, n in p.ttft.items():
                        buckets[le] = buckets.get(le, 0.0) + n
                series["rps"].append(round(sum(p.requests for p in parts) / seconds, 3))
                series["tps"].append(round(sum(p.output_tokens for p in parts) / seconds, 1))
                series["queue"].append(current.queue)
                for chart, q in (("ttft_p50", 0.5), ("ttft_p95", 0.95)):
                    value = quantile(q, buckets)
                    series[chart].append(None if value is None else round(value * 1000, 1))
        return {"t": times, "models": out}


def latest(export: dict) -> dict[str, dict[str, float | None]]:
    """Each model's last value of each chart (the charts' text alternative in the fleet table)."""
    return {model: {chart: next((v for v in reversed(values) if v is not None), None) if values else None
                    for chart, values in charts.items()}
            for model, charts in export["models"].items()}
