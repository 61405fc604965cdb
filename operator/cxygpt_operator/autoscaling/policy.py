"""Autoscaling decisions (pure): demand × current replicas × spec.autoscaling × recommendation history × now →
replicas."""
from __future__ import annotations

import datetime
import math
from dataclasses import dataclass, field

# The HPA's defaults: a ratio within 10 % of 1 changes nothing; scale-up is not stabilized unless asked.
TOLERANCE = 0.1
DEFAULT_MIN_REPLICAS = 1
DEFAULT_SCALE_DOWN_DELAY_S = 300
DEFAULT_SCALE_UP_WINDOW_S = 0
# How often each autoscaled model decides (and the gateways are read, once for all models)
DEFAULT_INTERVAL_S = 5.0
# Recommendation times are stored rounded up to this step (a fraction of the window, 1 to 15 s): a steady
# recommendation rewrites the status at most once per step, and an entry lives at most one step longer.
MAX_TIME_STEP_S = 15
# The status key the autoscaler owns (the reconcile leaves it alone)
AUTOSCALING_STATUS = "autoscaling"
# A float demand such as 4.000000001 is 4 (prometheus text round trips, sums of means).
EPSILON = 1e-6


@dataclass(frozen=True)
class Policy:
    """spec.autoscaling with its defaults; `target` is in flight + waiting per replica."""
    min_replicas: int
    max_replicas: int
    target: float
    scale_down_delay_s: float = DEFAULT_SCALE_DOWN_DELAY_S
    scale_up_window_s: float = DEFAULT_SCALE_UP_WINDOW_S

    def clamp(self, replicas: int) -> int:
        return max(self.min_replicas, min(self.max_replicas, replicas))

    @property
    def time_step_s(self) -> int:
        return max(1, min(int(self.scale_down_delay_s // 20), MAX_TIME_STEP_S))


@dataclass(frozen=True)
class AutoscalingSpec:
    """spec.autoscaling as written (enabled), with the CRD's defaults; the target may be left to the profile."""
    min_replicas: int = DEFAULT_MIN_REPLICAS
    max_replicas: int = 1
    target: int | None = None
    scale_down_delay_s: int = DEFAULT_SCALE_DOWN_DELAY_S
    scale_up_window_s: int = DEFAULT_SCALE_UP_WINDOW_S

    def policy(self, default_target: float | None) -> Policy:
        """The policy in force; `default_target` (the profile's max concurrency) is needed without a target."""
        target = self.target or default_target
        if not target:
            raise ValueError("spec.autoscaling has no targetInFlightPerReplica and there is no default")
        return Policy(self.min_replicas, self.max_replicas, float(target),
                      self.scale_down_delay_s, self.scale_up_window_s)


# field → (bounds) of spec.autoscaling, as the CRD has them (for specs applied without the schema)
_BOUNDS = {"minReplicas": (0, 64), "maxReplicas": (1, 64), "targetInFlightPerReplica": (1, 4096),
           "scaleDownDelaySeconds": (0, 86400), "scaleUpStabilizationSeconds": (0, 3600)}


def parse_autoscaling(spec: dict) -> AutoscalingSpec | None:
    """spec.autoscaling when it is on, else None; ValueError for what the schema refuses."""
    block = spec.get("autoscaling")
    if block is None:
        return None
    if not isinstance(block, dict) or "maxReplicas" not in block:
        raise ValueError("spec.autoscaling.maxReplicas is required")
    if block.get("enabled", True) is False:
        return None
    for name, (low, high) in _BOUNDS.items():
        value = block.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high):
            raise ValueError(f"spec.autoscaling.{name} must be an integer from {low} to {high}, not {value!r}")
    parsed = AutoscalingSpec(min_replicas=block.get("minReplicas", DEFAULT_MIN_REPLICAS),
                             max_replicas=block["maxReplicas"], target=block.get("targetInFlightPerReplica"),
                             scale_down_delay_s=block.get("scaleDownDelaySeconds", DEFAULT_SCALE_DOWN_DELAY_S),
                             scale_up_window_s=block.get("scaleUpStabilizationSeconds", DEFAULT_SCALE_UP_WINDOW_S))
    if parsed.min_replicas > parsed.max_replicas:
        raise ValueError("spec.autoscaling.minReplicas must be <= spec.autoscaling.maxReplicas")
    return parsed


def autoscaling_of(spec: dict) -> AutoscalingSpec | None:
    """What the autoscaler acts on: spec.autoscaling when it is on and valid (the reconcile reports an invalid one)."""
    try:
        return parse_autoscaling(spec)
    except ValueError:
        return None


@dataclass(frozen=True)
class Demand:
    """What the gateways report for one model: in flight + waiting, summed over the gateways. `value` None: no
    gateway could be read. `complete` False: some gateway could not be read (its share is unknown)."""
    value: float | None
    complete: bool = True
    sources: str = ""  # "read/known" gateways, for the status


@dataclass(frozen=True)
class Recommendation:
    at: float       # seconds since the epoch (rounded up to the policy's time step)
    replicas: int


@dataclass(frozen=True)
class History:
    """Recommendations that can still decide: `highs` (replicas strictly decreasing, newest last) give the highest
    one of the scale-down window, `lows` (strictly increasing) the lowest of the scale-up window. Each holds at most
    one entry per replica count, so at most maxReplicas + 1."""
    highs: tuple[Recommendation, ...] = ()
    lows: tuple[Recommendation, ...] = ()

    def record(self, replicas: int, now: float, policy: Policy) -> History:
        step = policy.time_step_s
        at = math.ceil(now / step) * step
        highs = [r for r in self.highs if r.at > now - policy.scale_down_delay_s and r.replicas > replicas]
        highs.append(Recommendation(at, replicas))
        lows = []
        if policy.scale_up_window_s > 0:
            lows = [r for r in self.lows if r.at > now - policy.scale_up_window_s and r.replicas < replicas]
            lows.append(Recommendation(at, replicas))
        return History(tuple(highs), tuple(lows))

    def highest(self, since: float) -> int | None:
        return max((r.replicas for r in self.highs if r.at > since), default=None)

    def lowest(self, since: float) -> int | None:
        return min((r.replicas for r in self.lows if r.at > since), default=None)


@dataclass(frozen=True)
class Decision:
    replicas: int            # what spec.replicas should be
    recommendation: int      # what the demand alone asks for (within min and max)
    reason: str
    message: str
    history: History = field(default_factory=History)


def _ceil(value: float) -> int:
    return math.ceil(value - EPSILON)


def recommend(demand: Demand, current: int, policy: Policy) -> tuple[int, str, str]:
    """The HPA's rule on one sample: ceil(current × demand / (current × target)) = ceil(demand / target), the
    current count when that ratio is within the tolerance; never below the current count when part of the demand
    is unknown, the current count when none is known. Not yet within min and max."""
    target = policy.target
    if demand.value is None:
        return current, "NoMetrics", "no gateway reported demand: the replica count stays"
    wanted = _ceil(demand.value / target) if demand.value > 0 else 0
    said = f"demand {demand.value:g} at a target of {target:g} per replica"
    if current > 0:
        ratio = demand.value / (current * target)
        if abs(ratio - 1) <= TOLERANCE:
            return current, "WithinTolerance", (f"{said}: {ratio:.2f} of {current} replicas' target, "
                                                 f"within {TOLERANCE:g}")
    if not demand.complete and wanted < current:
        return current, "IncompleteMetrics", (f"{said} from {demand.sources or 'some'} gateways; the others' is "
                                               "unknown, so no scale-down")
    return wanted, "Demand", f"{said} asks for {wanted} replicas"


def decide(demand: Demand, current: int, policy: Policy, history: History | None, now: float, *,
           last_set: int | None = None) -> Decision:
    """The replica count for now, as the HPA stabilizes it: never above the highest recommendation of the last
    scale_down_delay_s (so the count drops only after demand stayed low that long, and to 0 only after that long
    with no demand at all), never below the lowest of the last scale_up_window_s. A model at 0 with demand starts
    at once (ceil(demand / target), at least 1).
    `history` None: the first decision for this model. `last_set`: the count this autoscaler set last. A count set
    by someone else since (a gateway waking the model from 0, kubectl scale), and the count found at the first
    decision, count as a recommendation made now: kept for a scale-down window unless demand needs more."""
    raw, why, message = recommend(demand, current, policy)
    wanted = policy.clamp(raw)
    outside = last_set is not None and last_set != current
    if outside or history is None:
        history = (history or History()).record(current, now, policy)
    history = history.record(wanted, now, policy)
    # the recommendation just recorded is in both windows unless its time step ends exactly now
    down = history.highest(now - policy.scale_down_delay_s)
    down = wanted if down is None else down
    up = history.lowest(now - policy.scale_up_window_s) if policy.scale_up_window_s > 0 else wanted
    up = wanted if up is None else up
    replicas = min(max(current, up), down)
    if current == 0 and wanted > 0:
        replicas = wanted  # requests are waiting: no stabilization from zero
    replicas = policy.clamp(replicas)
    if raw > policy.max_replicas:
        why, message = "LimitedByMax", f"{message}; maxReplicas is {policy.max_replicas}"
    elif raw < policy.min_replicas and why == "Demand":
        why, message = "LimitedByMin", f"{message}; minReplicas is {policy.min_replicas}"

    window = f"{policy.scale_down_delay_s:g} s"
    if replicas > current:
        reason, message = ("ScaledFromZero" if current == 0 else "ScaledUp"), f"{current} -> {replicas}: {message}"
    elif replicas < current and replicas == 0:
        reason, message = "ScaledToZero", f"{current} -> 0: no demand for {window}"
    elif replicas < current:
        reason = "ScaledDown"
        message = f"{current} -> {replicas}: {message}; the highest recommendation of the last {window} is {replicas}"
    elif outside:
        reason = "Woken" if last_set == 0 else "ScaledOutside"
        who = "a gateway waking the model for a request, or kubectl scale" if last_set == 0 else "kubectl scale"
        message = (f"spec.replicas was set to {current} outside the autoscaler ({who}): kept for at least {window} "
                   "unless demand needs more")
    elif wanted < current:
        reason = "ScaleDownStabilized"
        message = f"{message}; the highest recommendation of the last {window} is {down}, so {current} stay"
    elif wanted > current:
        reason = "ScaleUpStabilized"
        message = f"{message}; the lowest recommendation of the last {policy.scale_up_window_s:g} s is {up}"
    else:
        reason = why if why != "Demand" else "Steady"
    return Decision(replicas, wanted, reason, message, history)


# --- status (pure): what the resource keeps so that an operator restart keeps its decisions --------------------

def rfc3339(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC).timestamp()
    except (TypeError, ValueError):
        return None


def _entries(items: object) -> tuple[Recommendation, ...]:
    out = []
    for item in items if isinstance(items, list) else ():  # what a status holds may be anything
        at = parse_time(item.get("at")) if isinstance(item, dict) else None
        replicas = item.get("replicas") if isinstance(item, dict) else None
        if at is not None and isinstance(replicas, int) and replicas >= 0:
            out.append(Recommendation(at, replicas))
    return tuple(out)


def history_from_status(autoscaling: dict | None) -> History | None:
    """The stored history, or None when there is none (a model the autoscaler has not decided on yet)."""
    autoscaling = autoscaling or {}
    if "recommendations" not in autoscaling:
        return None
    return History(_entries(autoscaling.get("recommendations")), _entries(autoscaling.get("upRecommendations")))


def _stored(entries: tuple[Recommendation, ...]) -> list[dict]:
    return [{"at": rfc3339(r.at), "replicas": r.replicas} for r in entries]


def round_demand(value: float | None) -> float | None:
    """Two significant digits: the status changes with the demand, not with its noise."""
    if value is None:
        return None
    if value <= 0:
        return 0
    rounded = float(f"{value:.2g}")
    return int(rounded) if rounded == int(rounded) else rounded


def decision_status(decision: Decision, demand: Demand, policy: Policy, current: int, previous: dict,
                    now: float) -> dict:
    """status.autoscaling for a decision the operator acts on (it writes spec.replicas when it differs from
    `current`); `previous` is the status.autoscaling before."""
    status = {
        "scaler": "Operator", "active": True, "scaleFromZero": True,
        "target": policy.target, "demand": round_demand(demand.value), "gateways": demand.sources or None,
        "desiredReplicas": decision.replicas,
        "lastScaleTime": rfc3339(now) if decision.replicas != current else previous.get("lastScaleTime"),
        "reason": decision.reason, "message": decision.message,
        "recommendations": _stored(decision.history.highs),
        "upRecommendations": _stored(decision.history.lows) if policy.scale_up_window_s > 0 else None,
    }
    return {k: v for k, v in status.items() if v is not None}


def external_status(scaler: str, scale_from_zero: bool, reason: str, message: str) -> dict:
    """status.autoscaling while someone else sets the count (an HPA or a KEDA ScaledObject): the operator writes
    none; `scaleFromZero` says whether the gateway holds requests for the model at 0 (KEDA starts it from 0)."""
    return {"scaler": scaler, "active": False, "scaleFromZero": scale_from_zero, "reason": reason, "message": message}
