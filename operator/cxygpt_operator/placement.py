"""Engine pod settings (pure): spec.engine's over the operator's defaults, what they may not set, and which GPU nodes
they let an engine onto (nodeSelector, required node affinity, taints)."""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

OWNED_LABELS = ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component",
                "app.kubernetes.io/part-of", "app.kubernetes.io/managed-by", "pod-template-hash")
OWNED_PREFIX = "cxygpt.io/"
GPU_RESOURCE_PREFIX = "nvidia.com/"
MAX_ENTRIES = 32          # labels, annotations, node selector entries, tolerations (the CRD's bounds)
MAX_RESOURCES = 16
NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
AFFINITY_PARTS = ("nodeAffinity", "podAffinity", "podAntiAffinity")
# taints that keep a pod off a node it does not tolerate them on (PreferNoSchedule only discourages)
KEEPING_EFFECTS = ("NoSchedule", "NoExecute")


class SettingsError(ValueError):
    """Pod settings the schema refuses (or would have)."""


@dataclass(frozen=True)
class PodSettings:
    """The engine pods' scheduling and metadata settings (spec.engine's, or the operator's defaults)."""
    node_selector: Mapping[str, str] = field(default_factory=dict)
    affinity: Mapping[str, dict] = field(default_factory=dict)    # nodeAffinity, podAffinity, podAntiAffinity
    tolerations: tuple[dict, ...] = ()
    runtime_class: str | None = None
    priority_class: str | None = None
    requests: Mapping[str, object] = field(default_factory=dict)
    limits: Mapping[str, object] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)

    def over(self, defaults: PodSettings) -> PodSettings:
        """These settings over `defaults`: maps key by key, tolerations added, affinity part by part, the rest whole."""
        tolerations = (*defaults.tolerations, *(t for t in self.tolerations if t not in defaults.tolerations))
        return PodSettings(node_selector={**defaults.node_selector, **self.node_selector},
                           affinity={**defaults.affinity, **self.affinity}, tolerations=tolerations,
                           runtime_class=self.runtime_class or defaults.runtime_class,
                           priority_class=self.priority_class or defaults.priority_class,
                           requests={**defaults.requests, **self.requests}, limits={**defaults.limits, **self.limits},
                           labels={**defaults.labels, **self.labels},
                           annotations={**defaults.annotations, **self.annotations})

    @property
    def required_node_terms(self) -> list[dict]:
        node = self.affinity.get("nodeAffinity") or {}
        return list((node.get("requiredDuringSchedulingIgnoredDuringExecution") or {}).get("nodeSelectorTerms") or [])

    @property
    def preferred_node_terms(self) -> list[dict]:
        return list((self.affinity.get("nodeAffinity") or {}).get("preferredDuringSchedulingIgnoredDuringExecution")
                    or [])


def _strings(value: object, where: str, *, max_value: int) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > MAX_ENTRIES:
        raise SettingsError(f"{where} must be a map of at most {MAX_ENTRIES} entries")
    for key, item in value.items():
        if not isinstance(key, str) or not isinstance(item, str) or len(item) > max_value:
            raise SettingsError(f"{where}.{key}: a string of at most {max_value} characters")
    return dict(value)


def _quantities(value: object, where: str) -> dict[str, object]:
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > MAX_RESOURCES:
        raise SettingsError(f"{where} must be a map of at most {MAX_RESOURCES} resources")
    for key, quantity in value.items():
        if str(key).startswith(GPU_RESOURCE_PREFIX):
            raise SettingsError(f"{where}.{key}: resources cannot name GPUs (nvidia.com/*): the operator requests "
                                "the GPUs sizing chose")
        if isinstance(quantity, bool) or not isinstance(quantity, int | str):
            raise SettingsError(f"{where}.{key}: a quantity (e.g. 8, 500m, 64Gi)")
    return dict(value)


def _class_name(value: object, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 253 or not NAME.match(value):
        raise SettingsError(f"{where} must be a lower-case DNS subdomain name of at most 253 characters")
    return value


def parse_pod_settings(raw: Mapping | None, where: str = "spec.engine") -> PodSettings:
    """spec.engine's pod settings (or the operator's defaults file), checked as the CRD checks them (for specs
    applied without the schema, and for the defaults, which no schema sees)."""
    raw = raw or {}
    labels = _strings(raw.get("podLabels"), f"{where}.podLabels", max_value=63)
    for key in labels:
        if key.startswith(OWNED_PREFIX) or key in OWNED_LABELS:
            raise SettingsError(f"{where}.podLabels cannot set the operator's labels ({OWNED_PREFIX}*, "
                                f"{', '.join(OWNED_LABELS)}): {key}")
    annotations = _strings(raw.get("podAnnotations"), f"{where}.podAnnotations", max_value=4096)
    if owned := next((key for key in annotations if key.startswith(OWNED_PREFIX)), None):
        raise SettingsError(f"{where}.podAnnotations cannot set {OWNED_PREFIX}* annotations (the operator's): {owned}")
    affinity = raw.get("affinity") or {}
    if not isinstance(affinity, dict) or set(affinity) - set(AFFINITY_PARTS):
        raise SettingsError(f"{where}.affinity: only {', '.join(AFFINITY_PARTS)}")
    tolerations = raw.get("tolerations") or []
    if not isinstance(tolerations, list) or len(tolerations) > MAX_ENTRIES \
            or not all(isinstance(t, dict) for t in tolerations):
        raise SettingsError(f"{where}.tolerations: a list of at most {MAX_ENTRIES} tolerations")
    resources = raw.get("resources") or {}
    if not isinstance(resources, dict) or set(resources) - {"requests", "limits"}:
        raise SettingsError(f"{where}.resources: only requests and limits")
    return PodSettings(
        node_selector=_strings(raw.get("nodeSelector"), f"{where}.nodeSelector", max_value=63),
        affinity={k: v for k, v in affinity.items() if v}, tolerations=tuple(tolerations),
        runtime_class=_class_name(raw.get("runtimeClassName"), f"{where}.runtimeClassName"),
        priority_class=_class_name(raw.get("priorityClassName"), f"{where}.priorityClassName"),
        requests=_quantities(resources.get("requests"), f"{where}.resources.requests"),
        limits=_quantities(resources.get("limits"), f"{where}.resources.limits"),
        labels=labels, annotations=annotations)


SETTINGS_KEYS = ("nodeSelector", "affinity", "tolerations", "runtimeClassName", "priorityClassName", "resources",
                 "podLabels", "podAnnotations")


def load_defaults(path: str | Path) -> PodSettings:
    """The operator's engine defaults (the chart renders them from engines.* in its values): a YAML map of the same
    fields as spec.engine's pod settings. A bad file stops the operator at start, naming the field."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as e:
        raise SettingsError(f"{path}: cannot read: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise SettingsError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise SettingsError(f"{path}: a map of {', '.join(SETTINGS_KEYS)}")
    if unknown := sorted(set(raw) - set(SETTINGS_KEYS)):
        raise SettingsError(f"{path}: unknown field(s) {', '.join(map(str, unknown))}; "
                            f"known: {', '.join(SETTINGS_KEYS)}")
    try:
        return parse_pod_settings(raw, where="engines")
    except SettingsError as e:
        raise SettingsError(f"{path}: {e}") from None


# --- which nodes the settings admit --------------------------------------------------------------------------------

def _requirement_holds(req: dict, labels: Mapping[str, str]) -> bool:
    key, op, values = req.get("key", ""), req.get("operator", ""), list(req.get("values") or [])
    if op == "Exists":
        return key in labels
    if op == "DoesNotExist":
        return key not in labels
    if op == "In":
        return key in labels and labels[key] in values
    if op == "NotIn":
        return key not in labels or labels[key] not in values
    if op in ("Gt", "Lt") and key in labels and len(values) == 1:
        try:
            have, bound = int(labels[key]), int(values[0])
        except ValueError:
            return False
        return have > bound if op == "Gt" else have < bound
    return False


def term_holds(term: dict, labels: Mapping[str, str], name: str) -> bool:
    """A node selector term: every expression on the labels and every field (metadata.name) holds; an empty term
    selects nothing (as Kubernetes has it)."""
    expressions, fields_ = term.get("matchExpressions") or [], term.get("matchFields") or []
    if not expressions and not fields_:
        return False
    named = {"metadata.name": name}
    return all(_requirement_holds(e, labels) for e in expressions) and all(
        _requirement_holds(f, named) for f in fields_)


def tolerates(toleration: dict, taint: Mapping[str, str]) -> bool:
    """Kubernetes' rule: the effect (empty: any), then the key (empty with Exists: any), then the value (Equal)."""
    if toleration.get("effect") and toleration["effect"] != taint.get("effect"):
        return False
    operator, key = toleration.get("operator") or "Equal", toleration.get("key") or ""
    if not key:
        return operator == "Exists"
    if key != taint.get("key"):
        return False
    return operator == "Exists" or (toleration.get("value") or "") == (taint.get("value") or "")


def keeps_off(settings: PodSettings, tolerations: Iterable[dict], *, labels: Mapping[str, str], name: str,
              taints: Sequence[Mapping[str, str]]) -> str | None:
    """Why the settings keep an engine pod off this node (its nodeSelector, its required node affinity, a taint it
    does not tolerate), or None when they let it on."""
    for key, value in sorted(settings.node_selector.items()):
        if labels.get(key) != value:
            return f"nodeSelector {key}={value}"
    terms = settings.required_node_terms
    if terms and not any(term_holds(t, labels, name) for t in terms):
        return "the required node affinity of spec.engine.affinity"
    tolerations = list(tolerations)
    for taint in taints:
        if taint.get("effect") in KEEPING_EFFECTS and not any(tolerates(t, taint) for t in tolerations):
            value = f"={taint['value']}" if taint.get("value") else ""
            return f"taint {taint.get('key')}{value}:{taint.get('effect')} (not in spec.engine.tolerations)"
    return None

