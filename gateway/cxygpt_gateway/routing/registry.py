"""Routes: per model its limits in force, queue, degradation monitor, and its LoRA adapters' routes (on its queue);
updated by discovery."""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

from cxygpt_profiles import Limits, ProfileTable

from ..admission.degrade import DegradeMonitor
from ..admission.demand import DemandWindow
from ..admission.policy import effective
from ..admission.queue import ModelQueue
from ..admission.ratelimit import Rate, Scope
from ..discovery.base import AdapterSpec, ModelSpec, Unavailable
from ..errors import GatewayError
from .policies import Routing, resolve

log = logging.getLogger("cxygpt.gateway")


def no_ready_replica(name: str, why: Unavailable | None) -> GatewayError:
    """503 for a model that exists but has no replica to take the request, saying why (and when to retry)."""
    why = why or Unavailable(f"model {name} has no ready replica right now (each one failed its last request "
                             "or health check)", retry_after_s=5)
    return GatewayError(503, why.message, code="no_ready_replica", reason="no_ready_replica",
                        retry_after=why.retry_after_s)


def model_gone(name: str) -> GatewayError:
    return GatewayError(404, f"model {name!r} is no longer served here; see GET /v1/models", code="model_not_found",
                        param="model", reason="unknown_model")


def adapter_removed(name: str, parent: str, in_flight: int) -> GatewayError:
    """503 for an adapter discovery no longer lists while its requests still run: 404 once they have ended."""
    return GatewayError(503, f"adapter {name} is being removed from model {parent}: its {in_flight} requests in "
                             "flight finish first, then the name is not served", code="adapter_removed",
                        reason="adapter_removed", retry_after=1)


class ModelRoute:
    parent: str | None = None   # a LoRA adapter's base model (AdapterRoute)
    adapter: str | None = None  # the adapter name a request asks its replicas for (AdapterRoute)

    def __init__(self, spec: ModelSpec, limits: Limits, mode: str, profile: str | None, routing: Routing, *,
                 auto_degrade: bool, degrade_window_s: float, clock: Callable[[], float],
                 on_degrade: Callable[[str, bool, str], None], demand_window_s: float = 10.0, gateways: int = 1):
        self.name = spec.name
        self.queue = ModelQueue(queue_size=limits.queue_size, max_concurrency=limits.max_concurrency,
                                routing=routing, clock=clock, gateways=gateways)
        self.demand = DemandWindow(demand_window_s, clock)
        self.degrade = DegradeMonitor(limits.degrade, window_s=degrade_window_s, clock=clock,
                                      on_change=lambda degraded, why: on_degrade(self.name, degraded, why))
        self.auto_degrade = auto_degrade
        self.configure(spec, limits, mode, profile, routing)

    def configure(self, spec: ModelSpec, limits: Limits, mode: str, profile: str | None, routing: Routing) -> None:
        self.spec, self.limits, self.mode, self.profile = spec, limits, mode, profile
        self.scope = Scope(f"model:{self.name}", f"model {self.name}", Rate(limits.rate_qps, limits.rate_tpm))
        self.queue.set_limits(queue_size=limits.queue_size, max_concurrency=limits.max_concurrency)
        self.queue.set_routing(routing)
        self.queue.set_backends(spec.urls)
        # an autoscaled model with no ready replica holds requests until one is (a cold start), others refuse them;
        # those held when that ends (the model failed, or its autoscaling went) hear why now
        held, self.queue.hold_empty = self.queue.hold_empty, spec.scale_from_zero is not None
        if held and not self.queue.hold_empty and not self.queue.routable():
            self.queue.close(lambda: no_ready_replica(self.name, spec.unavailable))
        self.degrade.thresholds = limits.degrade

    @property
    def routing(self) -> Routing:
        return self.queue.router.routing

    @property
    def tokenizer_name(self) -> str:
        """The name /tokenize is asked with (an adapter's: its base's, whose tokenizer it shares)."""
        return self.spec.served_name

    @property
    def degrade_enabled(self) -> bool:
        return self.auto_degrade and self.mode == "multi"

    def is_degraded(self) -> bool:
        if not self.degrade_enabled:
            return False
        self.degrade.observe_queue_depth(self.queue.waiting)
        return self.degrade.update()

    def routable(self) -> bool:
        return bool(self.queue.routable())

    def state(self) -> str:
        """ready (a replica takes requests), scaled_to_zero or starting (an autoscaled model: a request waits for
        its first replica), unavailable (a request is refused with 503, saying why)."""
        if self.routable():
            return "ready"
        target = self.spec.scale_from_zero
        if target is None:
            return "unavailable"
        return "scaled_to_zero" if target.replicas == 0 else "starting"


class AdapterRoute(ModelRoute):
    """A LoRA adapter served as a model of its own: its own name, limits (the base's unless set) and rate budgets,
    on its base model's queue, replicas, degradation monitor and demand (the same GPUs do the work). Its requests
    go only to the replicas that have it loaded."""

    def __init__(self, base: ModelRoute, adapter: AdapterSpec, limits: Limits):
        self.name = self.adapter = adapter.name
        self.configure(base, adapter, limits)

    def configure(self, base: ModelRoute, adapter: AdapterSpec, limits: Limits) -> None:  # type: ignore[override]
        self.base, self.source, self.parent = base, adapter.source, base.name
        self.queue, self.demand, self.degrade, self.auto_degrade = base.queue, base.demand, base.degrade, \
            base.auto_degrade
        self.spec = dataclasses.replace(base.spec, name=adapter.name, upstream_model=adapter.name, adapters=())
        self.limits, self.mode, self.profile = limits, base.mode, base.profile
        self.scope = Scope(f"model:{self.name}", f"model {self.name}", Rate(limits.rate_qps, limits.rate_tpm))

    @property
    def tokenizer_name(self) -> str:
        return self.base.spec.served_name

    def state(self) -> str:
        """The base's state; while no ready replica has the adapter loaded, `loading`."""
        state = self.base.state()
        return "loading" if state == "ready" and not self.queue.serving(self.name) else state


class Registry:
    """The ModelSink discovery writes into; effective limits are applied here, once per change."""

    def __init__(self, table: ProfileTable, *, single_user: bool | None = None, force_profile: str | None = None,
                 auto_degrade: bool = False, degrade_window_s: float = 30.0, routing_policy: str | None = None,
                 routing_epsilon: float | None = None, clock: Callable[[], float] = time.monotonic,
                 on_degrade: Callable[[str, bool, str], None] = lambda model, degraded, why: None,
                 demand_window_s: float = 10.0, gateways: int = 1, max_adapters: int = 32):
        self.table, self.single_user, self.force_profile = table, single_user, force_profile
        self.max_adapters = max_adapters  # served per model, the first ones listed: bounds the metrics' labels
        self.gateways = self.configured_gateways = gateways
        self.routing_policy, self.routing_epsilon = routing_policy, routing_epsilon  # every model's defaults
        self.demand_window_s = demand_window_s
        self.auto_degrade, self.degrade_window_s, self.clock, self.on_degrade = (
            auto_degrade, degrade_window_s, clock, on_degrade)
        self.routes: dict[str, ModelRoute] = {}
        self.reserved: dict[str, Unavailable] = {}  # served names without a route yet: 503, not 404
        self.adapters: dict[str, AdapterRoute] = {}  # LoRA adapters' served names (each on its base's queue)
        self.draining: dict[str, AdapterRoute] = {}  # adapters no longer listed whose requests still run
        self._refused: set[str] = set()  # adapter names refused (a clash, over the count), logged once each

    def upsert(self, spec: ModelSpec) -> None:
        eff = effective(spec.limits, spec.mode, spec.profile, table=self.table, single_user=self.single_user,
                        force_profile=self.force_profile)
        routing = resolve(spec.routing_policy or self.routing_policy,
                          self.routing_epsilon if spec.routing_epsilon is None else spec.routing_epsilon, eff.mode)
        self.reserved.pop(spec.name, None)
        route = self.routes.get(spec.name)
        if route is None:
            self.routes[spec.name] = ModelRoute(spec, eff.limits, eff.mode, eff.profile, routing,
                                                auto_degrade=self.auto_degrade,
                                                degrade_window_s=self.degrade_window_s, clock=self.clock,
                                                on_degrade=self.on_degrade, demand_window_s=self.demand_window_s,
                                                gateways=self.gateways)
            log.info("model %s routed to %s (profile %s, %s-user, %s routing)", spec.name,
                     ", ".join(spec.urls) or "-", eff.profile, eff.mode, routing.policy)
        elif route.spec != spec:
            route.configure(spec, eff.limits, eff.mode, eff.profile, routing)
            log.info("model %s updated: %s", spec.name, ", ".join(spec.urls) or "-")
        self._sync_adapters()

    def _adapter_limits(self, spec: ModelSpec, adapter: AdapterSpec) -> Limits:
        if adapter.limits is None:
            return self.routes[spec.name].limits
        return effective(adapter.limits, spec.mode, spec.profile, table=self.table, single_user=self.single_user,
                         force_profile=self.force_profile).limits

    def _sync_adapters(self) -> None:
        """The adapters' routes from the models' specs. A name another model serves (or reserves) stays that
        model's; one that two models list is the one of the model whose name sorts first; past `max_adapters` of one
        model, the first ones listed are served. Each refusal is logged once. An adapter no longer listed drains:
        its requests finish, new ones get 503 until they have (then 404)."""
        wanted: dict[str, tuple[ModelRoute, AdapterSpec]] = {}
        refused: dict[str, str] = {}
        for base in sorted(self.routes.values(), key=lambda r: r.name):
            for at, adapter in enumerate(base.spec.adapters):
                name = adapter.name
                if at >= self.max_adapters:
                    refused[f"{base.name}/{name}"] = (f"adapter {name} of model {base.name} is not served: the model "
                                                      f"lists more than max_adapters_per_model ({self.max_adapters})")
                elif name in self.routes or name in self.reserved:
                    refused[f"{base.name}/{name}"] = (f"adapter {name} of model {base.name} is not served: a model "
                                                      "of that name is")
                elif name in wanted:
                    refused[f"{base.name}/{name}"] = (f"adapter {name} of model {base.name} is not served: model "
                                                      f"{wanted[name][0].name} lists it too (the first name wins)")
                else:
                    wanted[name] = base, adapter
        for why in refused.keys() - self._refused:
            log.warning(refused[why])
        self._refused = set(refused)
        for name in list(self.adapters):
            if name not in wanted:
                gone = self.adapters.pop(name)
                if name not in self.routes and gone.queue.adapter_requests(name):
                    self.draining[name] = gone
                log.info("adapter %s of model %s removed", name, gone.parent)
        for name, (base, adapter) in wanted.items():
            self.draining.pop(name, None)
            limits = self._adapter_limits(base.spec, adapter)
            route = self.adapters.get(name)
            if route is None:
                self.adapters[name] = AdapterRoute(base, adapter, limits)
                log.info("adapter %s served on model %s", name, base.name)
            else:
                route.configure(base, adapter, limits)

    def removed_adapter(self, name: str) -> GatewayError | None:
        """For an adapter that was removed while its requests ran: 503 while they still do; None once they have
        ended (the name is then unknown: 404)."""
        route = self.draining.get(name)
        if route is None:
            return None
        in_flight = route.queue.adapter_requests(name)
        if not in_flight:
            del self.draining[name]
            return None
        return adapter_removed(name, route.parent or "-", in_flight)

    def reserve(self, name: str, why: Unavailable) -> None:
        if (route := self.routes.pop(name, None)) is not None:
            log.info("model %s has no route now: %s", name, why.message)
            route.queue.close(lambda: no_ready_replica(name, why))
        self.reserved[name] = why
        self._sync_adapters()

    def remove(self, name: str) -> None:
        self.reserved.pop(name, None)
        if (route := self.routes.pop(name, None)) is not None:
            log.info("model %s removed", name)
            route.queue.close(lambda: model_gone(name))
        self._sync_adapters()

    def set_gateways(self, count: int | None) -> None:
        """The gateway replicas sharing the engines' slots, as discovery counts them; None: the configured count."""
        gateways = count or self.configured_gateways
        if gateways != self.gateways:
            log.info("%d gateway replicas share the engines' slots", gateways)
            self.gateways = gateways
            for route in self.routes.values():
                route.queue.set_gateways(gateways)

    def get(self, name: str) -> ModelRoute | None:
        """The model or adapter of that served name."""
        return self.routes.get(name) or self.adapters.get(name)

    def routable(self) -> list[ModelRoute]:
        return [r for r in self.routes.values() if r.routable()]
