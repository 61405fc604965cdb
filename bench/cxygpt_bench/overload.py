"""G4's overload criteria for one front at one load point (pure): admitted TTFT, goodput, rejections."""
from __future__ import annotations

# the admitted p95 TTFT may exceed the engine's own at full occupancy by half, plus what the queue may add
TTFT_FACTOR = 1.5
REJECT_MAX_MS = 50.0
# degradation shortens answers, so more of them fit in the engine's time: it is held to the higher share
GOODPUT_MIN = {False: 0.90, True: 0.95}


def judge(point: dict, *, engine_full_ttft_p95_ms: float, queue_s: float, degrade: bool) -> dict:
    """Each bound next to whether `point` (a G4 result: ttft_p95_ms, goodput_ratio, rejections, reject_max_ms,
    rejections_with_retry_after) keeps it, and `met` for all three."""
    ttft_bound = TTFT_FACTOR * engine_full_ttft_p95_ms + queue_s * 1000
    ttft = point["ttft_p95_ms"]
    n = point["rejections"]
    v = {"ttft_bound_ms": ttft_bound, "ttft_ok": ttft is not None and ttft <= ttft_bound,
         "goodput_min": GOODPUT_MIN[degrade], "goodput_ok": point["goodput_ratio"] >= GOODPUT_MIN[degrade],
         "rejections_ok": n == 0 or (point["reject_max_ms"] <= REJECT_MAX_MS
                                     and point["rejections_with_retry_after"] == n)}
    v["met"] = v["ttft_ok"] and v["goodput_ok"] and v["rejections_ok"]
    return v
