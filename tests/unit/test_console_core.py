"""The console's pure parts: the charts' arithmetic, what the pages say about objects, log lines, sign-in rules."""
from __future__ import annotations

from datetime import UTC, datetime

import pytest

from cxygpt_console import views
from cxygpt_console.auth import Auth, LoginRefused, form_field
from cxygpt_console.logs import MATCH_LINES, MAX_LINE_CHARS, after_overlap, shown_lines
from cxygpt_console.relay import parse_tokenize, serving_model
from cxygpt_console.series import SeriesStore, intervals, latest, parse_scrape, quantile

NOW = datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC)


def exposition(requests: float, tokens: float, queue: float, buckets: dict[str, float], model="m") -> str:
    lines = ["# TYPE cxygpt_gateway_requests counter",
             f'cxygpt_gateway_requests_total{{code="200",model="{model}"}} {requests}',
             f'cxygpt_gateway_requests_total{{code="429",model="{model}"}} 1.0',
             "# TYPE cxygpt_gateway_completion_tokens counter",
             f'cxygpt_gateway_completion_tokens_total{{model="{model}"}} {tokens}',
             "# TYPE cxygpt_gateway_queue_depth gauge", f'cxygpt_gateway_queue_depth{{model="{model}"}} {queue}',
             "# TYPE cxygpt_gateway_ttft_seconds histogram"]
    lines += [f'cxygpt_gateway_ttft_seconds_bucket{{le="{le}",model="{model}"}} {n}' for le, n in buckets.items()]
    lines += ["# TYPE other_metric counter", 'other_metric_total{model="m"} 5']
    return "\n".join(lines) + "\n"


def test_a_scrape_sums_codes_and_keeps_the_ttft_buckets():
    scrape = parse_scrape(exposition(10, 300, 2, {"0.1": 3, "0.5": 8, "+Inf": 10}))
    m = scrape.models["m"]
    assert (m.requests, m.output_tokens, m.queue) == (11, 300, 2)
    assert m.ttft_buckets == {0.1: 3, 0.5: 8, float("inf"): 10}


def test_a_scrape_keeps_a_bounded_number_of_models():
    text = "".join(exposition(1, 1, 0, {"+Inf": 1}, model=f"m{i}") for i in range(5))
    scrape = parse_scrape(text, max_models=3)
    assert len(scrape.models) == 3 and scrape.dropped_models == 2


def test_intervals_add_replicas_and_count_a_restart_from_zero():
    before = {"a": parse_scrape(exposition(100, 1000, 1, {"0.1": 50, "+Inf": 100})),
              "b": parse_scrape(exposition(40, 400, 0, {"0.1": 20, "+Inf": 40}))}
    after = {"a": parse_scrape(exposition(110, 1100, 3, {"0.1": 55, "+Inf": 110})),
             "b": parse_scrape(exposition(5, 50, 1, {"0.1": 5, "+Inf": 5})),       # restarted: counts from zero
             "c": parse_scrape(exposition(7, 70, 2, {"0.1": 7, "+Inf": 7}))}      # new: its gauges only
    i = intervals(before, after, 5.0)["m"]
    assert i.requests == 10 + 6  # a: +10; b restarted: its 5 (+1 of code 429) since
    assert i.output_tokens == 100 + 50 and i.queue == 3 + 1 + 2
    assert i.ttft == {0.1: 5 + 5, float("inf"): 10 + 5}


@pytest.mark.parametrize("q, buckets, expected", [
    (0.5, {0.1: 50, 0.5: 100, float("inf"): 100}, 0.1),             # exactly at a bound
    (0.75, {0.1: 50, 0.5: 100, float("inf"): 100}, 0.3),            # halfway into (0.1, 0.5]
    (0.5, {0.1: 0, 0.5: 0, float("inf"): 10}, 0.5),                 # in +Inf: the highest finite bound
    (0.95, {0.25: 10, float("inf"): 10}, 0.2375),                   # within the first bucket, from 0
    (0.5, {0.1: 0, float("inf"): 0}, None),                         # nothing observed
])
def test_quantiles_as_prometheus_histogram_quantile(q, buckets, expected):
    assert quantile(q, buckets) == pytest.approx(expected) if expected is not None else quantile(q, buckets) is None


def test_the_store_keeps_15_minutes_and_smooths_over_rounds():
    store = SeriesStore(interval_s=5)
    assert store.rounds.maxlen == 180
    for n in range(200):
        store.add_round(1000.0 + 5 * n, {"gw": parse_scrape(exposition(10 * n, 100 * n, n % 3,
                                                                        {"0.05": 5 * n, "0.2": 10 * n, "+Inf": 10 * n}))})
    assert len(store.rounds) == 180
    export = store.export(smoothing_s=15)
    assert export["t"][0] == 1000.0 + 5 * 20 and len(export["t"]) == 180
    m = export["models"]["m"]
    assert m["rps"][-1] == 2.0 and m["tps"][-1] == 20.0 and m["queue"][-1] == 199 % 3
    assert m["ttft_p50"][-1] == 50.0 and m["ttft_p95"][-1] == pytest.approx(185.0)
    assert latest(export)["m"] == {"rps": 2.0, "tps": 20.0, "queue": 1, "ttft_p50": 50.0, "ttft_p95": 185.0}


def test_a_model_missing_from_a_round_is_a_gap():
    store = SeriesStore(interval_s=1)
    rounds = [{"x": 1}, {"x": 2, "y": 1}, {"x": 3}, {"x": 4, "y": 3}]
    for n, counts in enumerate(rounds):
        text = "".join(exposition(v, v, 0, {"+Inf": v}, model=name) for name, v in counts.items())
        store.add_round(float(n), {"gw": parse_scrape(text)})
    export = store.export(smoothing_s=1)
    # a series new to a replica (or back after a gap) counts from zero, as a counter does when it first appears
    assert export["models"]["y"]["rps"] == [2.0, None, 4.0]
    assert export["models"]["y"]["ttft_p95"] == [None, None, None]  # only +Inf observations: no finite bound


def md(name="m1", namespace="llm", phase="Ready", conditions=(), **status):
    return {"metadata": {"name": name, "namespace": namespace, "creationTimestamp": "2026-12-01T11:00:00Z"},
            "spec": {"model": {"name": f"served-{name}"}, "replicas": 2},
            "status": {"phase": phase, "readyReplicas": 1,
                       "selector": f"app.kubernetes.io/name=cxygpt-engine,app.kubernetes.io/instance={name}",
                       "conditions": list(conditions), **status}}


def condition(type_, status, reason="R", message="", at="2026-12-01T11:58:00Z"):
    return {"type": type_, "status": status, "reason": reason, "message": message, "lastTransitionTime": at}


def test_conditions_read_as_good_or_bad_news_in_words():
    obj = md(conditions=[condition("Degraded", "True", "CrashLoop", "engine exits"), condition("Available", "True"),
                         condition("Progressing", "False"), condition("CacheReady", "False"), condition("Custom", "True")])
    got = [(c.type, c.ok, c.words, c.since) for c in views.conditions_of(obj, NOW)]
    assert got == [("Available", True, "serving requests", "2 min ago"), ("Progressing", True, "settled", "2 min ago"),
                   ("Degraded", False, "in trouble", "2 min ago"),
                   ("CacheReady", False, "weights not cached yet", "2 min ago"),
                   ("Custom", True, "Custom is True", "2 min ago")]
    row = views.model_row(obj, None, None, NOW)
    assert row.trouble.reason == "CrashLoop" and row.ready == 1 and row.desired == 2


def test_limits_come_from_the_gateway_else_from_the_status():
    obj = md(limits={"maxInputTokens": 3840, "maxOutputTokens": 256, "rateQps": 5, "rateTpm": 60000, "queueSize": 32},
             mode="multi")
    row = views.model_row(obj, None, {"rps": 1.5}, NOW)
    assert row.limits["source"] == "status" and row.degraded is None
    assert row.limits_words == "input 3,840 tokens, output 256, 5 req/s, 60,000 tokens/min, queue 32"
    assert row.gateway_state == "unknown (the gateway could not be read)" and row.metrics == {"rps": 1.5}
    gateway = {"max_input_tokens": 16128, "max_output_tokens": 256, "output_cap_now": 128, "rate_qps": None,
               "rate_tpm": None, "queue_size": 1, "degraded": True, "degraded_reason": "p95 TTFT over 2500 ms",
               "state": "ready", "routing": {"policy": "least-load"}}
    row = views.model_row(obj, gateway, None, NOW)
    assert row.limits_words == "input 16,128 tokens, output 256 (now 128), no rate limit, queue 1"
    assert row.degraded and row.routing == "least-load" and row.gateway_state == "routable"
    assert views.model_row(obj, {}, None, NOW).gateway_state == "not routed by the gateway"


def test_the_fleet_takes_each_models_entry_of_the_gateways_limits():
    rows = views.fleet_rows([md("b"), md("a", namespace="z"), md("a")],
                            {"models": {"served-a": {"state": "scaled_to_zero"}}}, {"served-b": {"rps": 3}}, NOW)
    assert [r.id for r in rows] == ["llm/a", "llm/b", "z/a"]
    assert rows[0].gateway_state == "at zero: a request wakes it" and rows[1].metrics == {"rps": 3}
    assert rows[1].gateway_state == "not routed by the gateway"


def pod(name, namespace="llm", instance="m1", node="", restarts=0, last=None, gpus=None):
    labels = {"app.kubernetes.io/name": "cxygpt-engine", "app.kubernetes.io/instance": instance}
    container = {"name": "engine", "command": ["cxygpt-sim", "serve"], "args": ["Qwen/Qwen3-0.6B", "--port", "8000"]}
    if gpus:
        container["resources"] = {"limits": {"nvidia.com/gpu": str(gpus)}}
    return {"metadata": {"name": name, "namespace": namespace, "labels": labels,
                         "creationTimestamp": "2026-12-01T11:59:30Z"},
            "spec": {"containers": [container], **({"nodeName": node} if node else {})},
            "status": {"phase": "Running", "containerStatuses": [{"ready": True, "restartCount": restarts,
                                                                  "state": {"running": {}},
                                                                  "lastState": last or {}}]}}


def test_replicas_are_the_models_own_pods_with_restarts_and_last_state():
    pods = [pod("m1-abc-1", restarts=2, last={"terminated": {"reason": "Error", "exitCode": 1,
                                                             "message": "loading\nCUDA out of memory"}}),
            pod("m1-abc-2", namespace="other"), pod("m10-abc-1", instance="m10")]
    [replica] = views.replicas_of(md(), pods, NOW)
    assert replica.name == "m1-abc-1" and replica.restarts == 2 and replica.age == "30 s ago"
    assert replica.last_state == "terminated: Error (exit code 1): CUDA out of memory"
    assert views.run_command(md(), pods) == "cxygpt-sim serve Qwen/Qwen3-0.6B --port 8000"


def test_the_timeline_merges_conditions_and_events_about_the_model_and_its_pods():
    obj = md(conditions=[condition("Available", "False", "EnginesStarting", "0/2 ready", at="2026-12-01T11:50:00Z")])
    events = [
        {"metadata": {"namespace": "llm"}, "involvedObject": {"kind": "ModelDeployment", "name": "m1"},
         "reason": "ProfileSelected", "message": "SRV_80G", "type": "Normal", "lastTimestamp": "2026-12-01T11:40:00Z"},
        {"metadata": {"namespace": "llm"}, "involvedObject": {"kind": "Pod", "name": "m1-7d9f8c-xk2lp"},
         "reason": "BackOff", "message": "restarting", "type": "Warning", "count": 4,
         "lastTimestamp": "2026-12-01T11:55:00Z"},
        {"metadata": {"namespace": "llm"}, "involvedObject": {"kind": "Pod", "name": "m10-7d9f8c-xk2lp"},
         "reason": "Other", "type": "Normal", "lastTimestamp": "2026-12-01T11:56:00Z"},
        {"metadata": {"namespace": "elsewhere"}, "involvedObject": {"kind": "ModelDeployment", "name": "m1"},
         "reason": "Elsewhere", "type": "Normal", "lastTimestamp": "2026-12-01T11:57:00Z"}]
    timeline = views.timeline_of(obj, events, NOW)
    assert [(e.kind, e.reason, e.subject, e.ago) for e in timeline] == [
        ("Warning", "BackOff", "Pod m1-7d9f8c-xk2lp", "5 min ago"),
        ("condition", "EnginesStarting", "ModelDeployment", "10 min ago"),
        ("Normal", "ProfileSelected", "ModelDeployment", "20 min ago")]
    assert timeline[0].count == 4 and timeline[1].message == "Available False: not serving requests — 0/2 ready"


def test_the_derived_command_is_quoted_for_a_shell():
    obj = md(engineArgs=["Qwen/Qwen3-14B", "--served-model-name", "qwen3-14b", "--chat-template", "{{ a b }}"])
    assert views.vllm_command(obj) == "vllm serve Qwen/Qwen3-14B --served-model-name qwen3-14b --chat-template '{{ a b }}'"
    assert views.vllm_command(md()) == ""
    assert "managedFields" not in views.as_yaml({**obj, "metadata": {**obj["metadata"], "managedFields": [{}]}})


def test_gpu_nodes_with_what_runs_there_and_what_was_sized_for_them():
    nodes = [{"metadata": {"name": "n1", "labels": {"nvidia.com/gpu.memory": "81559", "nvidia.com/gpu.count": "2",
                                                     "nvidia.com/gpu.product": "NVIDIA-H100"}},
              "status": {"allocatable": {"nvidia.com/gpu": "2"}, "conditions": [{"type": "Ready", "status": "True"}]}},
             {"metadata": {"name": "n2", "labels": {"cxygpt.io/gpu-memory-mib": "32000"}}, "status": {}},
             {"metadata": {"name": "cpu-only", "labels": {}}, "status": {}}]
    mds = [md(gpu={"node": "n1", "count": 2}), md("m2", gpu={"node": "n2", "count": 1})]
    pods = [pod("m1-a-1", node="n1", gpus=1), pod("m1-a-2", node="n1", gpus=1), pod("m2-a-1", instance="m2")]
    n1, n2 = views.gpu_nodes(nodes, mds, pods)
    assert (n1.name, n1.ready, n1.product, n1.memory_mib, n1.count, n1.allocatable) == \
        ("n1", True, "NVIDIA-H100", 81559, 2, "2")
    assert n1.running == [("llm/m1", 2)] and n1.sized_for == ["llm/m1"]
    assert (n2.memory_mib, n2.count, n2.running, n2.sized_for) == (32000, None, [], ["llm/m2"])


def test_request_lines_are_held_back_and_long_lines_cut():
    lines = ['INFO:     10.1.2.3:5555 - "POST /v1/chat/completions HTTP/1.1" 200 OK',
             "INFO 12-01 10:00:00 [logger.py:39] Received request chatcmpl-9: prompt: 'hello'",
             "INFO Added request chatcmpl-9.", "INFO Finished request chatcmpl-9.",
             '{"ts": 1, "logger": "cxygpt.gateway.requests", "key_id": "team-a"}',
             "INFO Avg prompt throughput: 12.0 tokens/s", "x" * (MAX_LINE_CHARS + 10),
             "INFO HTTP Request: GET http://hub/api/models/x \"HTTP/1.1 200 OK\""]
    shown, hidden = shown_lines(lines)
    assert hidden == 5
    assert shown[0] == "INFO Avg prompt throughput: 12.0 tokens/s"
    assert shown[1] == "x" * MAX_LINE_CHARS + " …[cut]" and shown[2].startswith("INFO HTTP Request")


@pytest.mark.parametrize("seen, fetched, new", [
    ([], ["a", "b"], ["a", "b"]),
    (["a", "b", "c"], ["b", "c", "d", "e"], ["d", "e"]),
    (["a", "b", "c"], ["a", "b", "c"], []),
    (["a", "b"], ["x", "y"], ["x", "y"]),                       # no overlap: the log turned over
    (["x", "a", "x"], ["a", "x", "b", "x"], ["b", "x"]),          # the longest overlap decides
])
def test_a_resumed_log_read_gives_only_the_new_lines(seen, fetched, new):
    assert after_overlap(seen, fetched) == new


def test_locating_a_resumed_read_looks_at_the_last_lines_only():
    seen = [f"line {i}" for i in range(1000)]
    assert after_overlap(seen, seen[-MATCH_LINES:] + ["next"]) == ["next"]


async def test_sign_in_rules():
    with pytest.raises(ValueError, match="token"):
        Auth("token")
    with pytest.raises(ValueError, match="expected one of"):
        Auth("password")
    auth = Auth("token", token="s3cret")
    assert await auth.login("s3cret", "10.0.0.1") == "token"
    with pytest.raises(LoginRefused, match="wrong token"):
        await auth.login("s3cre", "10.0.0.1")
    assert auth.user({}) is None and auth.user({"user": "token"}) == "token"
    assert Auth("none").user({}) == "anonymous"

    async def gateway_says(key):
        return {"k1": "team-a", "anon": "anonymous"}.get(key)
    keyed = Auth("api-key", check_key=gateway_says)
    assert await keyed.login("k1", "10.0.0.2") == "team-a"
    for key in ("anon", "unknown", ""):  # the anonymous caller of a gateway that admits it is nobody to sign in
        with pytest.raises(LoginRefused):
            await keyed.login(key, "10.0.0.2")
    assert form_field(b"credential=a%2Bb%20c&other=1", "credential") == "a+b c"


def test_token_count_requests_are_checked_and_go_to_the_names_owner():
    with pytest.raises(ValueError, match="messages"):
        parse_tokenize(b'{"model": "m", "messages": []}')
    with pytest.raises(ValueError, match="model"):
        parse_tokenize(b'{"messages": [{"role": "user", "content": "x"}]}')
    wanted = parse_tokenize(b'{"model": "m", "messages": [{"role": "user", "content": "x", "name": "extra"}]}')
    assert wanted.messages == [{"role": "user", "content": "x"}]
    older, newer = md("old"), md("new")
    older["spec"]["model"]["name"] = newer["spec"]["model"]["name"] = "shared"
    older["metadata"]["creationTimestamp"], newer["metadata"]["creationTimestamp"] = "2026-01-01T00:00:00Z", \
        "2026-02-01T00:00:00Z"
    assert serving_model([newer, older], "shared") is older and serving_model([older], "none") is None
