"""Prometheus metrics under vLLM's names, types and labels, kept as plain numbers for a lean hot path."""
from __future__ import annotations

import time
from bisect import bisect_left
from collections import OrderedDict

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from .engine import Progress, Scheduler, Sequence, Step

# Bucket boundaries copied from vLLM 0.33 (vllm/v1/metrics/buckets.py).
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                           120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
TIME_TO_FIRST_TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                               7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
INTER_TOKEN_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                               10.0, 20.0, 40.0, 80.0)
# vLLM V1's fixed buckets for vllm:iteration_tokens_total (vllm/v1/metrics/loggers.py).
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
FINISH_REASONS = ("stop", "length", "abort")  # vLLM's FinishReason values that this engine can produce
# vllm:lora_requests_info gets a series per label combination, which vLLM keeps forever; readers take the newest
# (its value is the time it was set), so the simulator keeps the newest ones only
MAX_LORA_INFO_SERIES = 32


class Histogram:
    """Counts per bucket; observe(value, n) records n equal observations in one call."""

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...]):
        self.name, self.documentation, self.bounds = name, documentation, buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0

    def observe(self, value: float, n: int = 1) -> None:
        self.counts[bisect_left(self.bounds, value)] += n
        self.total += value * n

    def family(self, labels: list[str], values: list[str]) -> HistogramMetricFamily:
        cumulative, running = [], 0
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts):
            running += count
            cumulative.append((bound, running))
        family = HistogramMetricFamily(self.name, self.documentation, labels=labels)
        family.add_metric(values, cumulative, self.total)
        return family


class EngineMetrics:
    """A prometheus_client collector: gauges read the scheduler at scrape time, the rest are event counts."""

    def __init__(self, scheduler: Scheduler, model_name: str, max_loras: int | None = None, wall=time.time):
        """max_loras: --enable-lora's, which turns vllm:lora_requests_info on; wall: the clock its values read."""
        self.scheduler = scheduler
        self.max_loras, self.wall = max_loras, wall
        # adapter -> its requests that have output and have not ended, in the order adapters appear (vLLM's
        # LoRARequestStates, which hears of a request only with its first token)
        self.lora_requests: dict[str, set[str]] = {}
        self.lora_info: OrderedDict[tuple[str, str], float] = OrderedDict()  # (running, waiting) -> when set
        self.labels, self.values = ["model_name", "engine"], [model_name, "0"]
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.success = dict.fromkeys(FINISH_REASONS, 0)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              TIME_TO_FIRST_TOKEN_BUCKETS)
        self.inter_token = Histogram("vllm:inter_token_latency_seconds",
                                     "Histogram of inter-token latency in seconds.", INTER_TOKEN_LATENCY_BUCKETS)
        # The issue and vLLM < 0.11 name this per-token histogram vllm:time_per_output_token_seconds;
        # vLLM 0.33 exports vllm:inter_token_latency_seconds instead. Both are served, with equal data.
        self.time_per_output_token = Histogram("vllm:time_per_output_token_seconds",
                                               "Histogram of time per output token in seconds.",
                                               INTER_TOKEN_LATENCY_BUCKETS)
        self.request_tpot = Histogram("vllm:request_time_per_output_token_seconds",
                                      "Histogram of time_per_output_token_seconds per request.",
                                      INTER_TOKEN_LATENCY_BUCKETS)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                             REQUEST_LATENCY_BUCKETS)
        self.queue_time = Histogram("vllm:request_queue_time_seconds",
                                    "Histogram of time spent in WAITING phase for request.", REQUEST_LATENCY_BUCKETS)
        self.iteration_tokens = Histogram("vllm:iteration_tokens_total",
                                          "Histogram of number of tokens per engine_step.", ITERATION_TOKENS_BUCKETS)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def record_step(self, step: Step, progress: list[Progress], now: float) -> None:
        if step.tokens:
            self.iteration_tokens.observe(step.tokens)
        generated = 0
        for p in progress:
            seq = p.seq
            generated += p.new_tokens
            if p.gap_s is None:
                assert seq.scheduled_at is not None  # its first token: it was scheduled
                self.ttft.observe(now - seq.arrived)
                self.queue_time.observe(seq.scheduled_at - seq.arrived)
                self.prompt_tokens += seq.prompt_tokens
            else:
                self._inter_token(p.gap_s, 1)
            if p.new_tokens > 1:
                self._inter_token(0.0, p.new_tokens - 1)  # instant decode: the rest arrive in the same step
            if p.done:
                self.e2e.observe(now - seq.arrived)
                if seq.generated > 1 and seq.first_token_at is not None:
                    self.request_tpot.observe((now - seq.first_token_at) / (seq.generated - 1))
            if seq.lora:
                self._lora_request(seq.lora.name, seq.id, ended=p.done)
        self.generation_tokens += generated
        if self.max_loras is not None:
            self._lora_info()

    def _lora_request(self, name: str, seq_id: str, ended: bool) -> None:
        held = self.lora_requests.setdefault(name, set())
        if ended:
            held.discard(seq_id)
        else:
            held.add(seq_id)
        if not held:
            del self.lora_requests[name]

    def _lora_info(self) -> None:
        """Each step sets the series of its labels to now. vLLM 0.33 puts the same list into both labels: every
        adapter with a request that has had its first token and has not ended (one still waiting for its first
        step is in neither)."""
        adapters = ",".join(self.lora_requests)
        key = (adapters, adapters)
        self.lora_info.pop(key, None)
        self.lora_info[key] = self.wall()
        while len(self.lora_info) > MAX_LORA_INFO_SERIES:
            self.lora_info.popitem(last=False)

    def record_finish(self, reason: str) -> None:
        self.success[reason] += 1

    def record_abort(self, seq: Sequence, now: float) -> None:
        self.success["abort"] += 1
        self.e2e.observe(now - seq.arrived)
        if seq.lora and seq.lora.name in self.lora_requests:
            self._lora_request(seq.lora.name, seq.id, ended=True)

    def _inter_token(self, value: float, n: int) -> None:
        self.inter_token.observe(value, n)
        self.time_per_output_token.observe(value, n)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def collect(self):
        s, labels, values = self.scheduler, self.labels, self.values
        for name, doc, value in (
                ("vllm:num_requests_running", "Number of requests in model execution batches.", len(s.running)),
                ("vllm:num_requests_waiting", "Number of requests waiting to be processed.", len(s.waiting)),
                ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", s.kv_usage)):
            gauge = GaugeMetricFamily(name, doc, labels=labels)
            gauge.add_metric(values, value)
            yield gauge
        for name, doc, value in (
                ("vllm:prompt_tokens", "Number of prefill tokens processed.", self.prompt_tokens),
                ("vllm:generation_tokens", "Number of generation tokens processed.", self.generation_tokens),
                ("vllm:num_preemptions", "Cumulative number of preemption from the engine.",
                 s.preemptions_total),
                ("vllm:prefix_cache_queries",
                 "Prefix cache queries, in terms of number of queried tokens.", s.prefix_queries),
                ("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
                 s.prefix_hits)):
            counter = CounterMetricFamily(name, doc, labels=labels)
            counter.add_metric(values, value)
            yield counter
        success = CounterMetricFamily("vllm:request_success", "Count of successfully processed requests.",
                                      labels=[*labels, "finished_reason"])
        for reason, count in self.success.items():
            success.add_metric([*values, reason], count)
        yield success
        for histogram in (self.ttft, self.inter_token, self.time_per_output_token, self.request_tpot, self.e2e,
                          self.queue_time, self.iteration_tokens):
            yield histogram.family(labels, values)
        if self.max_loras is not None:
            # no model_name or engine label, as vLLM's
            info = GaugeMetricFamily("vllm:lora_requests_info", "Running stats on lora requests.",
                                     labels=["max_lora", "waiting_lora_adapters", "running_lora_adapters"])
            for (running, waiting), at in self.lora_info.items():
                info.add_metric([str(self.max_loras), waiting, running], at)
            yield info
