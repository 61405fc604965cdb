"""One reconcile of a ModelDeployment: resolve, compare, apply what changed, write status if it changed."""
from __future__ import annotations

import asyncio
import datetime
import logging
from dataclasses import dataclass

import json
from dataclasses import field

import kopf
from kubernetes.client.rest import ApiException

from cxygpt_profiles import GpuNode, ModelCatalog, NoFit, ProfileTable, Selection

from .autoscale import AUTOSCALING_STATUS
from .build import (CONFIG_HASH, EngineImages, Owner, build_deployment, build_failed_status, build_network_policy,
                    build_service, build_status, selector_labels)
from .kube import Kube
from .resolve import NameClaim, SpecError, name_claim, name_owner, parse_spec, resolve, schedulable_replicas

# Pending models are re-evaluated on every node change; this slow retry is only a safety net.
PENDING_RETRY_S = 600
# A rejected Deployment may be let through later by a fixed admission policy, which sends us no event.
REJECTED_RETRY_S = 300
# Answers that mean the API server refused this object (not: try again, or our credentials)
REJECTION_STATUSES = (400, 413, 422)


class NotYet(kopf.TemporaryError):
    """No GPU fits yet; carries the status that was written."""

    def __init__(self, message: str, *, delay: float, status: dict):
        super().__init__(message, delay=delay)
        self.status = status


class CannotRun(kopf.PermanentError):
    """Only a spec change (or, after `retry` seconds, maybe the cluster) can help; carries the status written."""

    def __init__(self, message: str, *, status: dict, retry: float | None = None):
        super().__init__(message)
        self.status, self.retry = status, retry


@dataclass
class Context:
    table: ProfileTable
    catalog: ModelCatalog
    kube: Kube
    images: EngineImages
    network_policy: bool = True
    metrics_namespaces: tuple[str, ...] = field(default=())
    gateway_namespaces: tuple[str, ...] = field(default=())


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _owned_by(obj: dict, owner: Owner) -> bool:
    return any(ref.get("uid") == owner.uid for ref in obj.get("metadata", {}).get("ownerReferences") or [])


def status_patch(previous: dict, desired: dict) -> dict:
    """A merge patch turning `previous` into `desired` (null removes keys that are gone)."""
    return {**{k: None for k in previous if k not in desired}, **desired}


async def _apply_if_changed(current: dict | None, desired: dict, apply, logger) -> dict:
    """The object as stored: unchanged, or as the apply answered (status included)."""
    annotations = (current or {}).get("metadata", {}).get("annotations") or {}
    same = (current is not None and annotations.get(CONFIG_HASH) == desired["metadata"]["annotations"][CONFIG_HASH]
            and (current.get("spec") or {}).get("replicas") == desired["spec"].get("replicas"))
    if same:
        return current
    logger.info("applying %s %s (config %s)", desired["kind"], desired["metadata"]["name"],
                desired["metadata"]["annotations"][CONFIG_HASH])
    return await asyncio.to_thread(apply, desired)


def _api_message(error: ApiException) -> str:
    try:
        return json.loads(error.body).get("message") or error.reason
    except (TypeError, ValueError, AttributeError):
        return str(error.body or error.reason)


async def _fail(ctx: Context, owner: Owner, previous: dict, reason: str, message: str, **kw) -> CannotRun:
    status = build_failed_status(owner, previous, reason, message, now=_now(), **kw)
    await _write_status(ctx, owner, previous, status)
    return CannotRun(message, status=status)


async def reconcile(body: dict, nodes: list[GpuNode], ctx: Context, logger: logging.Logger,
                    claims: list[NameClaim] = ()) -> dict:
    """Returns the status written (or kept). `claims` are every ModelDeployment's claim on this one's served
    name. Raises NotYet (a kopf.TemporaryError) when no GPU fits yet and CannotRun (a kopf.PermanentError)
    when only a spec change can help."""
    meta = body["metadata"]
    # status.autoscaling is the autoscaler's: never written here, not even back from an older snapshot
    previous = {k: v for k, v in (body.get("status") or {}).items() if k != AUTOSCALING_STATUS}
    owner = Owner(meta["name"], meta["namespace"], meta["uid"], meta.get("generation") or 1)
    try:
        spec = parse_spec(body.get("spec") or {})
    except SpecError as e:
        raise await _fail(ctx, owner, previous, "InvalidSpec", str(e)) from None

    reads = {"Deployment": ctx.kube.get_deployment, "Service": ctx.kube.get_service,
             "NetworkPolicy": ctx.kube.get_network_policy}
    current = {kind: await asyncio.to_thread(read, owner.namespace, owner.name) for kind, read in reads.items()}
    if not ctx.network_policy and current["NetworkPolicy"] is not None and not _owned_by(current["NetworkPolicy"], owner):
        current["NetworkPolicy"] = None  # someone else's, and we make none: not ours to judge
    for obj in current.values():
        if obj is not None and not _owned_by(obj, owner):
            message = f"a {obj['kind']} named {owner.name} exists and is not owned by this ModelDeployment"
            raise await _fail(ctx, owner, previous, "ResourceConflict", message)

    holder = name_owner(list(claims))
    if holder is not None and holder.uid != owner.uid:
        for kind, obj in current.items():
            if obj is not None:
                logger.info("deleting %s %s: the served name belongs to %s", kind, owner.name, holder.ref)
                await asyncio.to_thread(ctx.kube.delete, kind, owner.namespace, owner.name)
        message = (f"spec.model.name {spec.served_name!r} is served by {holder.ref}, "
                   "which claimed that name first")
        raise await _fail(ctx, owner, previous, "ModelNameConflict", message, engines_removed=True)

    try:
        outcome: Selection | NoFit = resolve(spec, nodes, ctx.table, ctx.catalog)
    except NoFit as e:
        outcome = e

    deployment, image, args, rejected = current["Deployment"], None, None, None
    if isinstance(outcome, Selection):
        desired = build_deployment(owner, spec, outcome, ctx.table, ctx.images)
        container = desired["spec"]["template"]["spec"]["containers"][0]
        image, args = container["image"], container["args"]
        try:
            deployment = await _apply_if_changed(deployment, desired, ctx.kube.apply_deployment, logger)
        except ApiException as e:
            if e.status not in REJECTION_STATUSES:
                raise
            rejected = _api_message(e)
            logger.warning("the API server rejected the engine Deployment: %s", rejected)
        await _apply_if_changed(current["Service"], build_service(owner, spec, outcome, ctx.table),
                                ctx.kube.apply_service, logger)
        if ctx.network_policy:
            await _apply_if_changed(current["NetworkPolicy"],
                                    build_network_policy(owner, spec, outcome, ctx.table, ctx.metrics_namespaces,
                                                         ctx.gateway_namespaces),
                                    ctx.kube.apply_network_policy, logger)
    # With no profile fitting, running engines are left alone: a node that flaps must not take a model down.
    if not ctx.network_policy and current["NetworkPolicy"] is not None:
        await asyncio.to_thread(ctx.kube.delete, "NetworkPolicy", owner.namespace, owner.name)

    pods = await asyncio.to_thread(ctx.kube.list_pods, owner.namespace, selector_labels(owner)) \
        if deployment is not None else []
    # the simulator requests no GPUs: any number of its replicas can be scheduled
    schedulable = schedulable_replicas(outcome, nodes) \
        if isinstance(outcome, Selection) and spec.engine_kind == "vllm" else None
    status = build_status(owner, spec, outcome, table=ctx.table, deployment=deployment, image=image, args=args,
                          previous=previous, now=_now(), pods=pods, rejected=rejected, schedulable=schedulable)
    status["nameClaim"] = name_claim(body, _now())  # the owner's claim, kept while the name stays
    await _write_status(ctx, owner, previous, status)
    if rejected:
        raise CannotRun(f"DeploymentRejected: {rejected}", status=status, retry=REJECTED_RETRY_S)
    if isinstance(outcome, NoFit):
        if outcome.permanent:
            raise CannotRun(f"{outcome.reason}: {outcome.message}", status=status)
        raise NotYet(f"{outcome.reason}: {outcome.message}", delay=PENDING_RETRY_S, status=status)
    return status


async def _write_status(ctx: Context, owner: Owner, previous: dict, status: dict) -> None:
    if status != previous:
        await asyncio.to_thread(ctx.kube.patch_status, owner.namespace, owner.name, status_patch(previous, status))
