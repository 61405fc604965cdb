"""One reconcile of a ModelDeployment: resolve, compare, apply what changed, write status if it changed."""
from __future__ import annotations

import asyncio
import datetime
import logging
from dataclasses import dataclass

import kopf

from cxygpt_profiles import GpuNode, ModelCatalog, NoFit, ProfileTable, Selection

from .build import (CONFIG_HASH, EngineImages, Owner, build_deployment, build_failed_status, build_service,
                    build_status)
from .kube import Kube
from .resolve import SpecError, parse_spec, resolve

# Pending models are re-evaluated on every node change; this slow retry is only a safety net.
PENDING_RETRY_S = 600


class NotYet(kopf.TemporaryError):
    """No GPU fits yet; carries the status that was written."""

    def __init__(self, message: str, *, delay: float, status: dict):
        super().__init__(message, delay=delay)
        self.status = status


class CannotRun(kopf.PermanentError):
    """Only a spec change can help; carries the status that was written."""

    def __init__(self, message: str, *, status: dict):
        super().__init__(message)
        self.status = status


@dataclass
class Context:
    table: ProfileTable
    catalog: ModelCatalog
    kube: Kube
    images: EngineImages


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


async def reconcile(body: dict, nodes: list[GpuNode], ctx: Context, logger: logging.Logger) -> dict:
    """Returns the status written (or kept). Raises NotYet (a kopf.TemporaryError) when no GPU fits yet
    and CannotRun (a kopf.PermanentError) when only a spec change can help."""
    meta, previous = body["metadata"], body.get("status") or {}
    owner = Owner(meta["name"], meta["namespace"], meta["uid"], meta.get("generation") or 1)
    try:
        spec = parse_spec(body.get("spec") or {})
    except SpecError as e:
        status = build_failed_status(owner, previous, "InvalidSpec", str(e), now=_now())
        await _write_status(ctx, owner, previous, status)
        raise CannotRun(str(e), status=status) from None

    try:
        outcome: Selection | NoFit = resolve(spec, nodes, ctx.table, ctx.catalog)
    except NoFit as e:
        outcome = e

    deployment = await asyncio.to_thread(ctx.kube.get_deployment, owner.namespace, owner.name)
    service = await asyncio.to_thread(ctx.kube.get_service, owner.namespace, owner.name)
    for obj in (deployment, service):
        if obj is not None and not _owned_by(obj, owner):
            message = f"a {obj['kind']} named {owner.name} exists and is not owned by this ModelDeployment"
            status = build_failed_status(owner, previous, "ResourceConflict", message, now=_now())
            await _write_status(ctx, owner, previous, status)
            raise CannotRun(message, status=status)

    image = args = None
    if isinstance(outcome, Selection):
        desired = build_deployment(owner, spec, outcome, ctx.table, ctx.images)
        container = desired["spec"]["template"]["spec"]["containers"][0]
        image, args = container["image"], container["args"]
        deployment = await _apply_if_changed(deployment, desired, ctx.kube.apply_deployment, logger)
        await _apply_if_changed(service, build_service(owner, spec, outcome, ctx.table),
                                ctx.kube.apply_service, logger)
    # With no profile fitting, running engines are left alone: a node that flaps must not take a model down.

    status = build_status(owner, spec, outcome, table=ctx.table, deployment=deployment, image=image, args=args,
                          previous=previous, now=_now())
    await _write_status(ctx, owner, previous, status)
    if isinstance(outcome, NoFit):
        if outcome.permanent:
            raise CannotRun(f"{outcome.reason}: {outcome.message}", status=status)
        raise NotYet(f"{outcome.reason}: {outcome.message}", delay=PENDING_RETRY_S, status=status)
    return status


async def _write_status(ctx: Context, owner: Owner, previous: dict, status: dict) -> None:
    if status != previous:
        await asyncio.to_thread(ctx.kube.patch_status, owner.namespace, owner.name, status_patch(previous, status))
