"""Prometheus metrics of one gateway app (own registry, so several apps can live in one process)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600)


class RouteStateCollector:
    """Queue depth and capacity, in-flight, degraded state and routable replicas read from the routes at
    scrape time: the hot path keeps no gauges up to date."""

    def __init__(self, routes, gateways, connections=lambda: 0):
        self.routes, self.gateways, self.connections = routes, gateways, connections

    def collect(self):
        yield GaugeMetricFamily("cxygpt_gateway_replicas", "Gateway replicas sharing the engines' slots, "
                                "this one included (the gateway Service's ready endpoints, or gateway_replicas)",
                                value=self.gateways())
        yield GaugeMetricFamily("cxygpt_gateway_connections", "Client connections open (the gateway's own server)",
                                value=self.connections())
        depth = GaugeMetricFamily("cxygpt_gateway_queue_depth", "Requests waiting for a slot", labels=["model"])
        in_flight = GaugeMetricFamily("cxygpt_gateway_in_flight", "Requests being served upstream",
                                      labels=["model"])
        degraded = GaugeMetricFamily("cxygpt_gateway_degraded", "1 while the model is degraded", labels=["model"])
        backends = GaugeMetricFamily("cxygpt_gateway_backends_routable", "Routable upstream replicas",
                                     labels=["model"])
        capacity = GaugeMetricFamily("cxygpt_gateway_queue_capacity", "Places in line (queue_size)",
                                     labels=["model"])
        slots = GaugeMetricFamily("cxygpt_gateway_concurrency_limit", "Requests served at once per replica",
                                  labels=["model"])
        demand = GaugeMetricFamily("cxygpt_gateway_demand", "Requests in flight + waiting, mean over the demand "
                                   "window (what the autoscaler reads)", labels=["model"])
        for route in list(self.routes()):
            queue = route.queue
            depth.add_metric([route.name], queue.waiting)
            in_flight.add_metric([route.name], queue.in_flight)
            degraded.add_metric([route.name], 1 if route.is_degraded() else 0)
            backends.add_metric([route.name], len(queue.routable()))
            capacity.add_metric([route.name], queue.queue_size)
            slots.add_metric([route.name], queue.max_concurrency)
            demand.add_metric([route.name], route.demand.value())
        yield from (depth, in_flight, degraded, backends, capacity, slots, demand)


class GatewayMetrics:
    def __init__(self, routes, gateways, connections=lambda: 0):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("cxygpt_gateway_requests", "Requests answered, by model and HTTP status",
                                ["model", "code"], registry=r)
        self.rejections = Counter("cxygpt_gateway_rejections", "Requests refused by admission, by reason",
                                  ["model", "reason"], registry=r)
        self.ttft = Histogram("cxygpt_gateway_ttft_seconds", "Time to first streamed event", ["model"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("cxygpt_gateway_request_duration_seconds", "Admission to last byte", ["model"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("cxygpt_gateway_queue_wait_seconds", "Time waited for a slot", ["model"],
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("cxygpt_gateway_prompt_tokens", "Input tokens served (upstream usage)",
                                     ["model"], registry=r)
        self.completion_tokens = Counter("cxygpt_gateway_completion_tokens",
                                         "Output tokens served (upstream usage)", ["model"], registry=r)
        self.upstream_errors = Counter("cxygpt_gateway_upstream_errors", "Upstream failures, by kind",
                                       ["model", "kind"], registry=r)
        self.degrade_transitions = Counter("cxygpt_gateway_degrade_transitions", "Entries into degraded state",
                                           ["model"], registry=r)
        self.ratelimit_storage_errors = Counter("cxygpt_gateway_ratelimit_storage_errors",
                                                "Rate-limit storage failures (admitted without limits)",
                                                registry=r)
        self.failovers = Counter("cxygpt_gateway_failovers",
                                 "Requests sent to another replica because none of them reached the first",
                                 ["model"], registry=r)
        self.routed = Counter("cxygpt_gateway_routed",
                              "Requests relayed, by routing policy and how they reached their replica: affinity (the "
                              "policy's first choice), spill (the load bound or a full replica moved it on), other "
                              "(a failover)", ["model", "policy", "choice"], registry=r)
        self.wakes = Counter("cxygpt_gateway_scale_from_zero_wakes", "Wakes of a model at zero replicas for a "
                             "request, by result (woken, awake: someone else had, failed)", ["model", "result"],
                             registry=r)
        self.client_disconnects = Counter("cxygpt_gateway_client_disconnects",
                                          "Requests cancelled because the client went away", ["model"], registry=r)
        self.connections_refused = Counter("cxygpt_gateway_connections_refused",
                                           "Client connections answered and closed by a bound: connection_limit, "
                                           "header_timeout, body_timeout, header_too_large", ["reason"], registry=r)
        self.tokenize_calls = Counter("cxygpt_gateway_tokenize_calls", "/tokenize calls made to count inputs",
                                      ["model"], registry=r)
        r.register(RouteStateCollector(routes, gateways, connections))
