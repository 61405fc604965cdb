"""Chaos on the dev cluster (the real control plane) under steady load through the gateway: rolling update, scale-up, killed engines, a name
conflict between tenants and hostile specs; every request is counted and any answer a client would not expect is
lost."""
from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import signal
import threading
import time
from dataclasses import dataclass

import openai
import pytest
import yaml
from test_devcluster import Dev, dev, sim_md  # noqa: F401 (dev: this module's own cluster, module-scoped)

from harness import REPO, wait_until

pytestmark = pytest.mark.timeout(420)
USERS = 4
# a request that started up to this long after the kill returned may still have reached the engine before the
# kernel closed its sockets (it counts as in flight): a few ms on an idle machine, tens on a busy CI
IN_FLIGHT_S = 0.2
PACE_S = 0.25  # each user starts a request at most this often: 4 users stay under SRV_80G's 20 QPS limit


@dataclass
class Outcome:
    started: float
    ended: float
    status: int                # 200, the HTTP status of an error, or 0 when no answer came at all
    message: str = ""
    retry_after: str | None = None


class Trickle:
    """USERS clients sending short non-streamed chats through the gateway, one every PACE_S each (a steady trickle
    under the rate limit), until stopped (bounded in count and time); every outcome is kept."""

    def __init__(self, dev: Dev, model: str, *, max_requests: int = 20_000, max_s: float = 240):
        self.dev, self.model, self.max_requests, self.max_s = dev, model, max_requests, max_s
        self.outcomes: list[Outcome] = []
        self.last: dict[int, float] = {}
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._user, daemon=True) for _ in range(USERS)]

    def _user(self):
        client = openai.OpenAI(base_url=self.dev.gateway + "/v1", api_key="none", max_retries=0, timeout=30)
        deadline = time.monotonic() + self.max_s
        while not self.stopping.is_set() and time.monotonic() < deadline and len(self.outcomes) < self.max_requests:
            started = time.monotonic()
            self.stopping.wait(max(0.0, self.last.get(threading.get_ident(), 0.0) + PACE_S - started))
            started = self.last[threading.get_ident()] = time.monotonic()
            try:
                reply = client.chat.completions.create(model=self.model, max_tokens=4,
                                                       messages=[{"role": "user", "content": "ping"}])
                ok = bool(reply.choices and reply.choices[0].message.content)
                self.outcomes.append(Outcome(started, time.monotonic(), 200 if ok else -1, "" if ok else "empty"))
            except openai.APIStatusError as e:
                self.outcomes.append(Outcome(started, time.monotonic(), e.status_code, e.message,
                                             e.response.headers.get("retry-after")))
            except openai.APIError as e:
                self.outcomes.append(Outcome(started, time.monotonic(), 0, repr(e)))

    def __enter__(self):
        for t in self.threads:
            t.start()
        wait_until(lambda: len(self.outcomes) >= USERS, timeout=30, what="load flowing")
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        for t in self.threads:
            t.join(timeout=40)

    def failures(self, since: float = 0.0, until: float = float("inf")) -> list[Outcome]:
        return [o for o in list(self.outcomes) if o.status != 200 and since <= o.started and o.ended <= until]

    def count(self, since: float = 0.0) -> int:
        return sum(o.started >= since for o in list(self.outcomes))


def summary(outcomes: list[Outcome]) -> str:
    by = {}
    for o in outcomes:
        by.setdefault((o.status, o.message[:120]), 0)
        by[o.status, o.message[:120]] += 1
    return "; ".join(f"{n} x {status} {message}" for (status, message), n in sorted(by.items()))


def ready_engines(dev: Dev, service: str) -> set[str]:
    """The ready endpoints (address:port) of a model's Service."""
    return set(dev.engines(service))


@contextlib.contextmanager
def serving(dev: Dev, name: str, replicas: int):
    """A simulator model with `replicas` ready engines for the block; deleted after it."""
    dev.apply(sim_md(name, name, replicas=replicas, env={"CXYGPT_SIM_ITL_MS": "2"}))
    try:
        wait_until(lambda: len(ready_engines(dev, name)) == replicas, timeout=90, what=f"{replicas} engines of {name}")
        yield
    finally:
        dev.kubectl("delete", "md", name, "--timeout=60s", check=False)


def kill_engine(dev: Dev, service: str, endpoint: str) -> None:
    """SIGKILL the engine process behind one endpoint (its pod's container; the kubelet restarts it)."""
    pids = dev.pod_pids(dev.engines(service)[endpoint])
    assert pids
    for pid in pids:
        os.kill(pid, signal.SIGKILL)


def test_rolling_update_and_scale_up_lose_no_request(dev):
    with serving(dev, "roll", 2):
        dev.kubectl("wait", "--for=condition=Available", "md/roll", "--timeout=90s")
        with Trickle(dev, "roll") as load:
            old = ready_engines(dev, "roll")
            dev.kubectl("patch", "md", "roll", "--type=merge", "-p",
                        json.dumps({"spec": {"engine": {"env": [{"name": "CXYGPT_SIM_ITL_MS", "value": "3"}]}}}))
            # every old engine replaced by a new one, two serving at the end
            wait_until(lambda: (lambda now: len(now) == 2 and not now & old)(ready_engines(dev, "roll")), timeout=120,
                       interval=0.2, what="rollout replaced both engines")
            wait_until(lambda: dev.md("roll")["status"].get("phase") == "Ready", timeout=60, what="rollout Ready")
            rolled = load.count()
            dev.kubectl("scale", "md", "roll", "--replicas=3")
            wait_until(lambda: len(ready_engines(dev, "roll")) == 3, timeout=60, what="three engines")
            wait_until(lambda: load.count() > rolled + 20, timeout=30, what="load on three engines")
        assert load.failures() == [], summary(load.failures())
        assert load.count() > rolled > 20  # requests flowed through the rollout and through the scale-up


def test_one_of_three_engines_killed_loses_only_what_was_in_flight_on_it(dev):
    with serving(dev, "trio", 3):
        with Trickle(dev, "trio") as load:
            victim = sorted(ready_engines(dev, "trio"))[0]
            kill_engine(dev, "trio", victim)
            killed = time.monotonic() + IN_FLIGHT_S
            wait_until(lambda: load.count(since=killed + 2) > 50, timeout=60, what="load after the kill")
            wait_until(lambda: len(ready_engines(dev, "trio")) == 3, timeout=60, what="the engine restarted")
            back = time.monotonic()
            wait_until(lambda: load.count(since=back) > 20, timeout=30, what="load after the restart")
        lost = load.failures()
        # at most one request per user can have been on the killed engine; none is a 404 or later than the kill
        assert len(lost) <= USERS and all(o.status not in (404, 503) and o.started <= killed for o in lost), \
            summary(lost)


def test_the_only_engine_killed_is_503_with_retry_after_until_it_is_back(dev):
    with serving(dev, "solo", 1):
        with Trickle(dev, "solo") as load:
            [endpoint] = ready_engines(dev, "solo")
            kill_engine(dev, "solo", endpoint)
            killed = time.monotonic() + IN_FLIGHT_S
            wait_until(lambda: ready_engines(dev, "solo") and load.count(since=time.monotonic() - 1) > 10
                       and not load.failures(since=time.monotonic() - 1), timeout=60, interval=0.2,
                       what="served again")
        lost = load.failures()
        in_flight = [o for o in lost if o.started <= killed and o.status != 503]  # a 503 is right at any time
        later = [o for o in lost if o.started > killed]
        assert len(in_flight) <= USERS, summary(in_flight)
        assert later, "the restart left no gap: the test saw nothing"
        assert all(o.status == 503 and o.retry_after and int(o.retry_after) >= 1 for o in later), summary(later)
        assert not [o for o in lost if o.status in (404, 502) and o.started > killed], summary(lost)


def test_a_second_tenant_with_the_same_model_name_does_not_capture_its_traffic(dev):
    dev.apply(sim_md("owner", "shared-name"))
    dev.wait_phase("owner")
    time.sleep(1.1)  # creationTimestamp has one-second granularity: the second one must be younger
    dev.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "tenant2"}}))
    squatter = sim_md("owner", "shared-name")
    squatter["metadata"]["namespace"] = "tenant2"
    dev.apply(squatter)
    try:
        def conflict():
            md = json.loads(dev.kubectl("get", "md", "owner", "-n", "tenant2", "-o", "json").stdout)
            status = md.get("status") or {}
            reasons = {c.get("reason"): c.get("message", "") for c in status.get("conditions") or []}
            return status.get("phase") == "Failed" and "ModelNameConflict" in reasons and reasons["ModelNameConflict"]
        assert "default/owner" in wait_until(conflict, timeout=60, what="ModelNameConflict")
        assert dev.kubectl("get", "deployments", "-n", "tenant2", "-o", "name").stdout.strip() == ""
        reply = dev.client.chat.completions.create(model="shared-name", max_tokens=2,
                                                   messages=[{"role": "user", "content": "whose?"}])
        assert reply.choices
    finally:
        dev.kubectl("delete", "md", "owner", "-n", "tenant2", "--timeout=60s", check=False)
        dev.kubectl("delete", "md", "owner", "--timeout=60s", check=False)


def hostile(name: str, **engine) -> str:
    md = sim_md(name, name)
    md["spec"]["engine"].update(engine)
    return yaml.safe_dump(md)


@pytest.mark.parametrize("engine, words", [
    ({"args": ["--port", "9000"]}, "--port"),
    ({"args": ["--served-model-name=other"]}, "--served-model-name"),
    ({"args": ["--trust-remote-code"]}, "trustRemoteCode"),
    ({"env": [{"name": "LD_PRELOAD", "value": "/tmp/x.so"}]}, "LD_*"),
    ({"env": [{"name": "HF_HOME", "value": "/tmp"}]}, "HF_HOME"),
    ({"env": [{"name": "9LIVES", "value": "x"}]}, "env"),
], ids=["port", "served-name", "remote-code", "ld-preload", "operator-env", "bad-env-name"])
def test_hostile_specs_are_refused_by_plain_kubectl_apply_with_a_message(dev, engine, words):
    out = dev.kubectl("apply", "-f", "-", stdin=hostile("hostile", **engine), check=False)
    assert out.returncode != 0 and words in out.stderr, out.stderr
    assert dev.kubectl("get", "md", "hostile", check=False).returncode != 0  # nothing was stored


def test_too_many_replicas_are_refused_and_a_refused_engine_argument_shows_as_failed(dev):
    md = sim_md("many", "many", replicas=100000)
    out = dev.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(md), check=False)
    assert out.returncode != 0 and "replicas" in out.stderr, out.stderr

    dev.kubectl("apply", "-f", "-", stdin=hostile("crashy", args=["--max-num-seqs", "-5"]))
    try:
        def failed():
            status = dev.md("crashy").get("status") or {}
            degraded = next((c for c in status.get("conditions") or [] if c["type"] == "Degraded"), {})
            return status.get("phase") == "Failed" and degraded.get("reason") == "EngineArgumentRefused" and degraded
        # at the engine's first exit: its log says the argument is refused, which no restart fixes
        degraded = wait_until(failed, timeout=60, interval=0.5, what="the refused argument shown as Failed")
        assert "exited" in degraded["message"] and "--max-num-seqs" in degraded["message"], degraded
        r = dev.client.with_options(max_retries=0)
        with pytest.raises(openai.APIStatusError) as err:
            r.chat.completions.create(model="crashy", max_tokens=2, messages=[{"role": "user", "content": "hi"}])
        assert err.value.status_code == 503 and "cannot serve" in err.value.message
    finally:
        dev.kubectl("delete", "md", "crashy", "--timeout=60s", check=False)


def test_plain_kubectl_apply_and_explain_work(dev):
    out = dev.kubectl("apply", "-f", str(REPO / "deploy" / "crds"))  # no --validate=false: OpenAPI is served
    assert "modeldeployments.cxygpt.io" in out.stdout
    explained = dev.kubectl("explain", "modeldeployment.spec").stdout
    assert "replicas" in explained and "engine" in explained


def test_deleting_a_model_under_load_finishes_the_streams_in_flight(dev):
    with serving(dev, "doomed", 1):
        fast = ready_engines(dev, "doomed")
        dev.kubectl("patch", "md", "doomed", "--type=merge", "-p", json.dumps(
            {"spec": {"engine": {"env": [{"name": "CXYGPT_SIM_ITL_MS", "value": "40"}]}}}))
        # the slower engine alone: the fast one it replaces stays ready until the new one is (a rolling update)
        wait_until(lambda: dev.md("doomed")["status"].get("phase") == "Ready"
                   and (lambda now: len(now) == 1 and not now & fast)(ready_engines(dev, "doomed")),
                   timeout=60, what="slower engine")

        def stream():
            chunks = dev.client.chat.completions.create(model="doomed", max_tokens=40, stream=True,
                                                        extra_body={"ignore_eos": True},
                                                        messages=[{"role": "user", "content": "a long one"}])
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            streams = [pool.submit(stream) for _ in range(3)]
            wait_until(lambda: metric_value(dev, "cxygpt_gateway_in_flight", "doomed") == 3, what="three in flight")
            dev.kubectl("delete", "md", "doomed", "--wait=false")
            texts = [s.result(timeout=60) for s in streams]  # 40 tokens x 40 ms each: whole, no error event
        assert all(texts), texts
        with pytest.raises(openai.NotFoundError):
            dev.client.chat.completions.create(model="doomed", max_tokens=2, messages=[{"role": "user", "content": "x"}])


def metric_value(dev: Dev, name: str, model: str) -> float:
    import re

    import httpx
    for line in httpx.get(dev.gateway + "/metrics", timeout=5).text.splitlines():
        if re.match(rf'^{name}\{{.*model="{model}".*\}} ', line):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
