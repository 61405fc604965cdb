"""One autoscaling step of a ModelDeployment: its spec.autoscaling and the gateways' demand in, spec.replicas
(through the scale subresource) and status.autoscaling out; an HPA or a KEDA ScaledObject on it wins."""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from .. import GROUP, KIND
from ..kube import Kube
from .demand import DemandReader
from .policy import (
    AUTOSCALING_STATUS,
    DEFAULT_INTERVAL_S,
    AutoscalingSpec,
    Decision,
    decide,
    decision_status,
    external_status,
    history_from_status,
)

log = logging.getLogger("cxygpt.operator.autoscaler")


def scale_target(kind: str, namespace: str, name: str, spec: dict) -> dict[tuple[str, str], str]:
    """An HPA's or a KEDA ScaledObject's target, when it is a ModelDeployment: {(namespace, name): "Kind ns/name"}
    (an index entry; {} for any other target)."""
    ref = (spec or {}).get("scaleTargetRef") or {}
    if ref.get("kind") == KIND and (ref.get("apiVersion") or "").split("/")[0] == GROUP and ref.get("name"):
        return {(namespace, ref["name"]): f"{kind} {namespace}/{name}"}
    return {}


@dataclass
class Scaler:
    """Operator-wide: the demand reader, the kube calls and the decision interval."""
    kube: Kube
    reader: DemandReader
    interval_s: float = DEFAULT_INTERVAL_S


@dataclass(frozen=True)
class Step:
    """What one step did: the status.autoscaling now ({}: none), and the Event to post."""
    status: dict
    event: tuple[str, str, str] | None = None   # (type, reason, message)


def _patch(previous: dict, desired: dict) -> dict:
    return {**{k: None for k in previous if k not in desired}, **desired}


async def autoscale(body: dict, wanted: AutoscalingSpec | None, scaler: Scaler, *, others: Sequence[str] = (),
                    written: dict | None = None, now: float | None = None) -> Step:
    """One decision for the ModelDeployment `body` (a snapshot) and its spec.autoscaling as parsed (`wanted`); writes
    what changed. `others`: the ScaledObjects, then the HPAs, that target it. `written`: the status.autoscaling this
    operator wrote last, which the body may not show yet (None after a restart: the body's is the truth then)."""
    meta, spec, status = body["metadata"], body.get("spec") or {}, body.get("status") or {}
    namespace, name = meta["namespace"], meta["name"]
    previous = written if written is not None else status.get(AUTOSCALING_STATUS) or {}
    now = time.time() if now is None else now
    event = None
    if others:
        keda = others[0].startswith("ScaledObject ")
        if wanted is not None:
            verb = "targets" if len(others) == 1 else "target"
            message = (f"{' and '.join(others)} {verb} this ModelDeployment: the operator writes no replica count "
                       "while spec.autoscaling is on too; remove one of them")
            desired = external_status(others[0], keda, "ConflictingAutoscaler", message)
            if previous.get("reason") != "ConflictingAutoscaler":
                event = ("Warning", "ConflictingAutoscaler", message)
        elif keda:
            desired = external_status(others[0], True, "ExternalAutoscaler",
                                      f"{others[0]} sets the replica count; the gateway holds requests at zero "
                                      "replicas until it has started one")
        else:
            desired = None
    elif wanted is None:
        desired = None
    else:
        default_target = (status.get("limits") or {}).get("maxConcurrency")
        if default_target is None and not wanted.target:
            return await _write(scaler, namespace, name, previous, {
                **{k: previous[k] for k in ("recommendations", "desiredReplicas", "lastScaleTime") if k in previous},
                "scaler": "Operator", "active": True, "scaleFromZero": True, "reason": "WaitingForProfile",
                "message": "no targetInFlightPerReplica and no profile chosen yet to take it from"}, None)
        policy = wanted.policy(default_target)
        snapshot = await scaler.reader.latest()
        demand = snapshot.demand((spec.get("model") or {}).get("name", ""))
        current = spec.get("replicas", 1)
        active = previous.get("active") is True and previous.get("scaler") == "Operator"
        decision: Decision = decide(demand, current, policy, history_from_status(previous) if active else None, now,
                                    last_set=previous.get("desiredReplicas") if active else None)
        scaled_to = None
        if decision.replicas != current:
            if await asyncio.to_thread(scaler.kube.scale, namespace, name, decision.replicas, current):
                scaled_to = decision.replicas
                log.info("%s/%s: %s", namespace, name, decision.message, extra={"fields": {
                    "object": f"{namespace}/{name}", "replicas": decision.replicas, "reason": decision.reason}})
                event = ("Normal", decision.reason, decision.message)
            else:  # changed meanwhile (a gateway woke it): decide again on what it is now
                return Step(previous)
        desired = decision_status(decision, demand, policy, current, previous, now)
        if snapshot.why and demand.value is None:
            desired["message"] = f"{desired['message']}: {snapshot.why}"
        if scaled_to is not None:
            desired["lastScaleMessage"] = decision.message
        elif "lastScaleMessage" in previous:
            desired["lastScaleMessage"] = previous["lastScaleMessage"]
        return await _write(scaler, namespace, name, previous, desired, event)
    return await _write(scaler, namespace, name, previous, desired, event)


async def _write(scaler: Scaler, namespace: str, name: str, previous: dict, desired: dict | None, event) -> Step:
    if (desired or {}) != previous:
        patch = None if desired is None else _patch(previous, desired)
        await asyncio.to_thread(scaler.kube.patch_status, namespace, name, {AUTOSCALING_STATUS: patch})
    return Step(desired or {}, event)
