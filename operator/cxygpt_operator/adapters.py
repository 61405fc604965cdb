"""LoRA adapters (pure): spec.adapters parsed, where each one's files are, and what each engine has to load or unload
→ the calls to make and status.adapters."""
from __future__ import annotations

import datetime
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from cxygpt_profiles.table import LORA_RANKS

from .cache import hf_source

MAX_ADAPTERS = 16       # the CRD's maxItems
MAX_NAME = 128          # a served model name's bound, as spec.model.name
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")
ADAPTERS_MOUNT = "/models/adapters"
# the engine pods' readiness gate: the operator sets it once the pod's engine has every adapter loaded (or refused),
# so a new replica takes no traffic before it serves its adapters
ADAPTERS_GATE = "cxygpt.io/adapters-loaded"
# the engine flags spec.adapters derives: spec.engine.args may not set them beside it
LORA_ARGS = ("enable-lora", "max-loras", "max-lora-rank", "max-cpu-loras", "lora-modules")
MESSAGE_CHARS = 300     # an engine's answer quoted in status and Events at most this long
# a pod whose containers are ready but whose adapters are not all in after this long takes traffic for its base anyway
# (an engine the operator cannot reach, a load that hangs): an adapter never keeps the base from serving
GATE_TIMEOUT_S = 120.0
FAILED_RETRY_S = 300.0  # a load that failed is tried again on that engine after this long (a Hub outage ends)


class AdapterError(ValueError):
    """A spec.adapters the schema should have refused (applied without the CRD's validation)."""


@dataclass(frozen=True, order=True)
class Adapter:
    """One entry of spec.adapters: the served name requests use, and where its files come from."""
    name: str
    source: str
    cached: str | None = None   # where the adapter cache holds a Hub adapter's files, once they are downloaded

    @property
    def claim(self) -> str | None:
        """The PersistentVolumeClaim a pvc:// adapter is read from."""
        scheme, _, rest = self.source.partition("://")
        return rest.split("/", 1)[0] if scheme == "pvc" else None

    @property
    def path(self) -> str | None:
        """The lora_path the engine loads it from: the claim's mount, the adapter cache's files, or a Hub repository
        id (the engine downloads it); None for a Hub revision other than the default branch outside the adapter
        cache, which vLLM cannot download (it passes no revision)."""
        scheme, _, rest = self.source.partition("://")
        if scheme == "pvc":
            claim, _, inside = rest.partition("/")
            return f"{claim_mount(claim)}/{inside}"
        if self.cached:
            return self.cached
        repo, revision = hf_source(self.source) or (rest, None)
        return repo if revision in (None, "main") else None


def claim_mount(claim: str) -> str:
    return f"{ADAPTERS_MOUNT}/{claim}"


@dataclass(frozen=True)
class LoraSpec:
    """spec.lora: the engine's adapter limits the spec overrides (None: the profile table's)."""
    max_rank: int | None = None
    max_loras: int | None = None


def parse_adapters(raw: object, base_name: str) -> tuple[Adapter, ...]:
    """spec.adapters as the schema checks it; the sources are checked by the caller (resolve.check_source)."""
    if raw is None:
        return ()
    if not isinstance(raw, list) or len(raw) > MAX_ADAPTERS:
        raise AdapterError(f"spec.adapters must be a list of at most {MAX_ADAPTERS} adapters")
    adapters = []
    for i, item in enumerate(raw):
        name, source = (item.get("name"), item.get("source")) if isinstance(item, dict) else (None, None)
        if not isinstance(name, str) or not isinstance(source, str):
            raise AdapterError(f"spec.adapters[{i}] needs a name and a source")
        if not 0 < len(name) <= MAX_NAME or not NAME.match(name):
            raise AdapterError(f"spec.adapters[{i}].name must be a served model name (letters, digits and ._:/-, "
                               f"starting with a letter or digit, at most {MAX_NAME} characters), "
                               f"not {name[:MAX_NAME]!r}")
        if name == base_name:
            raise AdapterError(f"spec.adapters[{i}].name {name!r} is the base's served name (spec.model.name)")
        adapters.append(Adapter(name, source))
    names = [a.name for a in adapters]
    if dupes := sorted({n for n in names if names.count(n) > 1}):
        raise AdapterError(f"spec.adapters: names must be unique ({', '.join(dupes)} twice)")
    return tuple(adapters)


def parse_lora(raw: object) -> LoraSpec:
    raw = raw or {}
    if not isinstance(raw, dict):
        raise AdapterError("spec.lora must be an object")
    rank, loras = raw.get("maxRank"), raw.get("maxLoras")
    if rank is not None and rank not in LORA_RANKS:
        raise AdapterError(f"spec.lora.maxRank must be one of {', '.join(map(str, LORA_RANKS))}, not {rank!r}")
    if loras is not None and (not isinstance(loras, int) or isinstance(loras, bool) or not 1 <= loras <= MAX_ADAPTERS):
        raise AdapterError(f"spec.lora.maxLoras must be an integer from 1 to {MAX_ADAPTERS}, not {loras!r}")
    return LoraSpec(rank, loras)


def loaded_summary(status: Sequence[Mapping[str, object]]) -> str:
    """status.adaptersLoaded: "<Loaded>/<adapters>"."""
    return f"{sum(s.get('phase') == 'Loaded' for s in status)}/{len(status)}"


def cut(text: str, bound: int = MESSAGE_CHARS) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= bound else text[:bound] + "..."


# --- what to load and unload (plan, then act) ------------------------------------------------------------------

@dataclass(frozen=True)
class Engine:
    """An engine pod as one pass saw it: its uid and name, and the adapters its /v1/models lists (name → root, the
    path it was loaded from), or None when it did not answer (starting, or gone)."""
    uid: str
    name: str
    loaded: Mapping[str, str] | None


@dataclass(frozen=True)
class Failure:
    """A load an engine refused: its answer, and when (it is tried again after FAILED_RETRY_S)."""
    message: str
    at: float


@dataclass(frozen=True)
class Call:
    """One call to an engine's runtime LoRA endpoints."""
    pod_uid: str
    pod: str
    action: str             # load | unload
    name: str
    path: str = ""
    inplace: bool = False   # the name is loaded from another path: loaded again in place


@dataclass(frozen=True)
class Plan:
    calls: tuple[Call, ...]
    status: list[dict]
    settled: bool           # nothing left to do that a later pass could do sooner than a retry
    complete: tuple[str, ...] = ()  # pods (uids) with every adapter loaded or refused: their readiness gate opens


@dataclass(frozen=True)
class Blocked:
    """Why an adapter is not loaded anywhere: (reason, message)."""
    reason: str
    message: str


def blocked_adapters(adapters: Sequence[Adapter], *, base_names: Mapping[str, str],
                     other_adapters: Mapping[str, str], offline: bool = False,
                     cache: bool = False) -> dict[str, Blocked]:
    """Adapters that must not be loaded: one named like another model's served name (`base_names`: name → that
    ModelDeployment, namespace/name) or like an adapter an older ModelDeployment serves (`other_adapters`), and
    without the adapter cache (`cache`: Hub adapters are downloaded into it) one whose Hub revision the engine
    cannot download or a Hub one on engines that run offline (`offline`: the base's weights are local,
    HF_HUB_OFFLINE=1)."""
    found = {}
    for a in adapters:
        if a.name in base_names:
            found[a.name] = Blocked("ModelNameConflict", f"{a.name!r} is the served name of {base_names[a.name]}")
        elif a.name in other_adapters:
            found[a.name] = Blocked("ModelNameConflict", f"{a.name!r} is an adapter of {other_adapters[a.name]}, "
                                    "which named it first")
        elif cache and not a.claim:
            continue
        elif offline and not a.claim:
            found[a.name] = Blocked("HubOffline", f"{a.source}: the engines run offline (HF_HUB_OFFLINE=1: the base's "
                                    "weights come from a claim), so they cannot download it: put its files on a claim "
                                    "and use pvc://<claim>/<path>")
        elif a.path is None:
            found[a.name] = Blocked("RevisionNotSupported", f"{a.source}: the engine downloads an adapter's default "
                                    "branch only (vLLM passes no revision): set spec.model.cache.enabled (the "
                                    "adapter is then downloaded at that revision into the model's adapter cache), "
                                    "drop the @revision, or put the files on a claim and use pvc://<claim>/<path>")
    return found


def plan(adapters: Sequence[Adapter], engines: Sequence[Engine], failures: Mapping[tuple[str, str, str], Failure],
         blocked: Mapping[str, Blocked], *, now: float, max_calls: int,
         waiting: Mapping[str, str] | None = None) -> Plan:
    """The calls that bring every answering engine to spec.adapters (at most `max_calls`, unloads first: they are
    quick and free slots), and status.adapters as the engines are now. `failures`: (pod uid, name, path) → the
    engine's refusal; a failed load is not tried again on that engine before FAILED_RETRY_S, nor for another
    path. Engines that did not answer count as replicas that do not have the adapter yet. `waiting`: adapters whose
    files are still downloading (name → what the download says): not loaded yet, and not unloaded where loaded."""
    waiting = waiting or {}
    wanted = {a.name: a.path for a in adapters if a.name not in blocked and a.name not in waiting and a.path}
    unloads, loads, complete = [], [], []
    for engine in engines:
        if engine.loaded is None:
            continue
        if all(engine.loaded.get(n) == p or (engine.uid, n, p) in failures for n, p in wanted.items()):
            complete.append(engine.uid)
        for name in sorted(set(engine.loaded) - set(wanted) - set(waiting)):
            unloads.append(Call(engine.uid, engine.name, "unload", name))
        for name, path in sorted(wanted.items()):
            if engine.loaded.get(name) == path:
                continue
            failed = failures.get((engine.uid, name, path))
            if failed is not None and now - failed.at < FAILED_RETRY_S:
                continue
            loads.append(Call(engine.uid, engine.name, "load", name, path, inplace=name in engine.loaded))
    calls = (unloads + loads)[:max_calls]
    status = []
    for a in adapters:
        entry: dict = {"name": a.name, "source": a.source, "replicas": len(engines)}
        done = [e for e in engines if e.loaded is not None and a.path and e.loaded.get(a.name) == a.path]
        entry["loadedReplicas"] = len(done)
        refused = [(e.name, failures[(e.uid, a.name, a.path or "")]) for e in engines
                   if (e.uid, a.name, a.path or "") in failures and e not in done]
        if a.name in blocked:
            entry.update(phase="Failed", reason=blocked[a.name].reason, message=cut(blocked[a.name].message))
        elif refused:
            pod, failure = min(refused, key=lambda f: f[1].at)
            # vLLM's words, and what to change when it is the engine's rank limit (a restart: the engines' flag)
            hint = "; raise spec.lora.maxRank to its rank" if "max_lora_rank" in failure.message else ""
            entry.update(phase="Failed", reason="AdapterLoadFailed",
                         message=cut(f"pod {pod}: {failure.message}") + f" ({len(done)}/{len(engines)} replicas)"
                         + hint)
        elif a.name in waiting:
            entry.update(phase="Loading", reason="Downloading", message=cut(waiting[a.name]))
        elif engines and len(done) == len(engines):
            entry.update(phase="Loaded", reason="Loaded", message=f"loaded on {len(done)}/{len(engines)} replicas")
        else:
            entry.update(phase="Loading", reason="Loading",
                         message=f"loaded on {len(done)}/{len(engines)} replicas" if engines
                         else "no engine replica is running")
        status.append(entry)
    return Plan(tuple(calls), status, settled=not unloads and not loads, complete=tuple(complete))


def _since(pod: dict, kind: str) -> datetime.datetime | None:
    """When the pod's condition `kind` turned True, or None while it is not True."""
    found = next((c for c in (pod.get("status") or {}).get("conditions") or [] if c.get("type") == kind), None)
    if not found or found.get("status") != "True" or not found.get("lastTransitionTime"):
        return None
    try:
        return datetime.datetime.fromisoformat(str(found["lastTransitionTime"]).replace("Z", "+00:00"))
    except ValueError:
        return None


def gate_condition(pod: dict, complete: bool, now: datetime.datetime) -> dict | None:
    """The readiness gate's condition to set on an engine pod now, or None: True once its engine has every adapter
    loaded or refused (`complete`), or once its containers have been ready GATE_TIMEOUT_S without that (it then
    serves its base; status.adapters says which adapters it lacks)."""
    gated = any(g.get("conditionType") == ADAPTERS_GATE for g in (pod.get("spec") or {}).get("readinessGates") or [])
    if not gated or _since(pod, ADAPTERS_GATE) is not None:
        return None
    stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    if complete:
        return {"type": ADAPTERS_GATE, "status": "True", "reason": "AdaptersLoaded", "lastProbeTime": None,
                "message": "every adapter of spec.adapters is loaded or refused", "lastTransitionTime": stamp}
    ready = _since(pod, "ContainersReady")
    if ready is not None and (now - ready).total_seconds() >= GATE_TIMEOUT_S:
        return {"type": ADAPTERS_GATE, "status": "True", "reason": "AdaptersNotLoaded", "lastProbeTime": None,
                "message": f"the engine did not have every adapter {GATE_TIMEOUT_S:.0f} s after it was ready: it "
                "serves its base and the adapters it has (status.adapters)", "lastTransitionTime": stamp}
    return None


@dataclass
class Memory:
    """What one model's adapter loop remembers between passes: the engines' refusals (pruned to the pods and paths
    still current)."""
    failures: dict[tuple[str, str, str], Failure] = field(default_factory=dict)

    def keep_only(self, engines: Sequence[Engine], adapters: Sequence[Adapter]) -> None:
        pods, current = {e.uid for e in engines}, {(a.name, a.path) for a in adapters}
        self.failures = {k: v for k, v in self.failures.items() if k[0] in pods and (k[1], k[2]) in current}
