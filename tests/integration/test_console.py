"""The console's behaviour as a process, against a real in-memory Kubernetes API (with container logs), a real gateway
with API keys, a real engine simulator and a real Prometheus: sign-in, what is relayed to the gateway and what not,
token counts, engine logs without users' request lines, its bounds."""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time

import httpx
import pytest
import yaml
from test_gateway_support import start_gateway, start_sim

from cxygpt_dev.kubeapi import write_kubeconfig
from harness import REPO, ServerProcess, console_script, free_port, wait_until

KEY, SLOW_KEY = "sk-console-gold", "sk-console-slow"
TOKEN = "console-token-for-tests"
MODEL, NAMESPACE, POD = "console-model", "default", "console-md-6c7d8e9f0a-abcde"


def write_keys(tmp) -> str:
    path = tmp / "keys.yaml"
    path.write_text(yaml.safe_dump({
        "allow_anonymous": False, "tiers": {"gold": {}, "slow": {"rate_qps": 1}},
        "keys": [{"id": "team-gold", "key_sha256": hashlib.sha256(KEY.encode()).hexdigest(), "tier": "gold"},
                 {"id": "team-slow", "key_sha256": hashlib.sha256(SLOW_KEY.encode()).hexdigest(), "tier": "slow"}]}))
    return str(path)


def kubectl(kubeconfig, *args, stdin=None):
    import subprocess
    out = subprocess.run([console_script("kubectl"), "--kubeconfig", str(kubeconfig), *args], capture_output=True,
                         text=True, input=stdin, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout


def start_console(tmp, kubeconfig, gateway_url, *args, name="console") -> ServerProcess:
    port = free_port()
    return ServerProcess([console_script("cxygpt-console"), "--kubeconfig", str(kubeconfig), "--gateway-url",
                          gateway_url, "--host", "127.0.0.1", "--port", str(port), "--interval", "0.5", *args],
                         port=port, health="/healthz", log_path=tmp / f"{name}.log").start()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("console")
    logs = tmp / "pod-logs"
    (logs / NAMESPACE / POD).mkdir(parents=True)
    (logs / NAMESPACE / POD / "engine.log").write_text(
        "INFO engine: loading weights\n"
        'INFO:     10.0.0.9:51234 - "POST /v1/chat/completions HTTP/1.1" 200 OK\n'
        "INFO engine: Received request chatcmpl-1: prompt: 'my secret plans', params: SamplingParams(...)\n"
        "INFO engine: ready to serve\n")
    processes = []
    try:
        api_port = free_port()
        api = ServerProcess([sys.executable, "-m", "cxygpt_dev.kubeapi", "--port", str(api_port), "--preload",
                             str(REPO / "deploy" / "crds"), "--pod-logs", str(logs)],
                            port=api_port, log_path=tmp / "kubeapi.log", health="/version").start()
        processes.append(api)
        kubeconfig = write_kubeconfig(tmp / "kubeconfig", api.url)
        sim = start_sim(tmp, MODEL, ttft_ms=0, itl_ms=2)
        processes.append(sim)
        gateway = start_gateway(tmp, {"models": [{"name": MODEL, "url": sim.url, "profile": "SRV_80G"}],
                                      "keys_file": write_keys(tmp)})
        processes.append(gateway)
        selector = {"app.kubernetes.io/name": "cxygpt-engine", "app.kubernetes.io/instance": "console-md"}
        kubectl(kubeconfig, "apply", "-f", "-", stdin=yaml.safe_dump_all([
            {"apiVersion": "cxygpt.io/v1alpha1", "kind": "ModelDeployment",
             "metadata": {"name": "console-md", "namespace": NAMESPACE},
             "spec": {"model": {"name": MODEL, "source": "hf://Qwen/Qwen3-14B"}, "engine": {"kind": "sim"}}},
            {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": POD, "namespace": NAMESPACE, "labels": selector},
             "spec": {"containers": [{"name": "engine", "image": "x"}]}},
            {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "someone-else", "namespace": NAMESPACE},
             "spec": {"containers": [{"name": "app", "image": "x"}]}},
            {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
             "metadata": {"name": "console-md-x", "namespace": NAMESPACE, "labels": {
                 "kubernetes.io/service-name": "console-md", "app.kubernetes.io/managed-by": "cxygpt-operator"}},
             "ports": [{"name": "http", "port": sim.port}],
             "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": True}}]}]))
        kubectl(kubeconfig, "patch", "md", "console-md", "--subresource=status", "--type=merge", "-p", json.dumps(
            {"status": {"phase": "Ready", "readyReplicas": 1, "ready": "1/1", "limits": {"maxInputTokens": 50},
                        "selector": ",".join(f"{k}={v}" for k, v in selector.items())}}))
        (tmp / "token").write_text(TOKEN + "\n")
        keyed = start_console(tmp, kubeconfig, gateway.url, "--auth", "api-key", name="keyed")
        processes.append(keyed)
        tokened = start_console(tmp, kubeconfig, gateway.url, "--auth", "token", "--token-file", str(tmp / "token"),
                                name="tokened")
        processes.append(tokened)
        yield {"keyed": keyed.url, "tokened": tokened.url, "gateway": gateway.url, "sim": sim.url, "logs": logs,
               "kubeconfig": kubeconfig, "tmp": tmp}
    finally:
        for process in reversed(processes):
            process.stop()


def signed_in(url: str, credential: str) -> httpx.Client:
    client = httpx.Client(base_url=url, timeout=10)
    answer = client.post("/login?next=/gpus", data={"credential": credential})
    assert answer.status_code == 303 and answer.headers["location"] == "/gpus", answer.text
    return client


def test_a_gateway_api_key_signs_in_and_only_its_id_is_kept(stack):
    url = stack["keyed"]
    page = httpx.get(url + "/", timeout=10)
    assert page.status_code == 303 and page.headers["location"] == "/login?next=/"
    for path in ("/api/series", "/events/fleet", "/gateway/v1/models"):  # the API too, and the relay
        answer = httpx.get(url + path, timeout=10)
        assert answer.status_code == 401 and answer.json()["error"]["code"] == "login_required", path
    refused = httpx.post(url + "/login", data={"credential": "sk-not-a-key"}, timeout=10)
    assert refused.status_code == 401 and "the gateway does not know this API key" in refused.text
    assert "set-cookie" not in refused.headers
    client = signed_in(url, KEY)
    cookie = client.cookies["cxygpt_console"]
    assert KEY not in cookie and KEY.encode().hex() not in cookie
    fleet = client.get("/")
    assert fleet.status_code == 200 and "Signed in as <strong>team-gold</strong>" in fleet.text
    assert "console-md" in fleet.text
    # the relay passes the browser's own key, never a key of the console's: without one the gateway refuses
    assert client.get("/gateway/v1/models").status_code == 401
    models = client.get("/gateway/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    assert models.status_code == 200 and models.json()["data"][0]["id"] == MODEL
    assert client.post("/logout").status_code == 303
    assert client.get("/").status_code == 303


def test_a_token_signs_in_and_guessing_is_limited(stack, tmp_path):
    url = stack["tokened"]
    assert httpx.post(url + "/login", data={"credential": "wrong"}, timeout=10).status_code == 401
    client = signed_in(url, TOKEN)
    assert client.get("/gpus").status_code == 200
    too_big = httpx.post(url + "/login", content=b"credential=" + b"x" * 5000, timeout=10,
                         headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert too_big.status_code == 413
    # a console of its own: its tries of the minute are all spent here
    console = start_console(tmp_path, stack["kubeconfig"], stack["gateway"], "--auth", "token", "--token-file",
                            str(stack["tmp"] / "token"))
    try:
        statuses = [httpx.post(console.url + "/login", data={"credential": f"guess-{i}"}, timeout=10).status_code
                    for i in range(12)]
        assert statuses == [401] * 10 + [429] * 2, statuses  # 10 tries a minute per client
        assert httpx.post(console.url + "/login", data={"credential": TOKEN}, timeout=10).status_code == 429
    finally:
        console.stop()


def test_only_the_playground_calls_are_relayed_streamed_and_refusals_passed_on(stack):
    client = signed_in(stack["keyed"], KEY)
    auth = {"Authorization": f"Bearer {KEY}"}
    assert client.post("/gateway/v1/completions", json={}, headers=auth).json()["error"]["code"] == "not_relayed"
    assert client.get("/gateway/metrics").status_code == 404
    big = client.post("/gateway/v1/chat/completions", content=b"{" + b" " * (1 << 20) + b"}", headers=auth)
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    body = {"model": MODEL, "stream": True, "max_tokens": 12, "messages": [{"role": "user", "content": "hi"}]}
    with client.stream("POST", "/gateway/v1/chat/completions", json=body, headers=auth) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and len(events) > 3
    # answers cut by the browser free their place: more of them than the console relays at once, then one more
    long = {**body, "max_tokens": 400}
    for _ in range(40):
        with client.stream("POST", "/gateway/v1/chat/completions", json=long, headers=auth) as r:
            assert r.status_code == 200
            next(r.iter_bytes())
        time.sleep(0.07)  # under the model's 20 requests a second
    with client.stream("POST", "/gateway/v1/chat/completions", json=body, headers=auth) as r:
        assert r.status_code == 200
    limits = client.get(f"/gateway/v1/limits?model={MODEL}", headers=auth).json()
    assert limits["key"]["id"] == "team-gold" and limits["model"] == MODEL
    # a key of one request a second: the second in a row is the gateway's 429, with its Retry-After
    slow = {"Authorization": f"Bearer {SLOW_KEY}"}
    answers = [client.post("/gateway/v1/chat/completions", headers=slow, json={**body, "stream": False})
               for _ in range(3)]
    refused = [a for a in answers if a.status_code == 429]
    assert refused and int(refused[0].headers["retry-after"]) >= 1
    assert refused[0].json()["error"]["code"] == "rate_limit_exceeded"


def test_token_counts_come_from_the_engine_against_the_limit(stack):
    client = signed_in(stack["keyed"], KEY)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "word " * 80}]
    counted = client.post("/api/tokenize", json={"model": MODEL, "messages": messages})
    assert counted.status_code == 200, counted.text
    engine = httpx.post(stack["sim"] + "/tokenize", json={"model": MODEL, "messages": messages}, timeout=10).json()
    assert engine["count"] > 50
    # this gateway wants a key for /v1/limits, and the console has none of its own: the limit is the ModelDeployment
    # status's (the playground weighs the count against the limit it reads with the user's key)
    assert counted.json() == {"model": MODEL, "count": engine["count"], "max_input_tokens": 50,
                              "over_by": engine["count"] - 50}
    for body, status in ((b"not json", 400), (json.dumps({"model": MODEL}).encode(), 400),
                         (json.dumps({"model": MODEL, "messages": [{"role": "user"}]}).encode(), 400),
                         (json.dumps({"model": "nobody-serves-this", "messages": messages}).encode(), 404),
                         (b'{"model": "x", "messages": [' + b'{"role": "user", "content": "x"},' * 50000 + b"]}", 413)):
        answer = client.post("/api/tokenize", content=body, headers={"Content-Type": "application/json"})
        assert answer.status_code == status, (body[:80], answer.text)


def test_engine_logs_follow_without_users_request_lines(stack):
    client = signed_in(stack["tokened"], TOKEN)
    url = f"{stack['tokened']}/events/logs/{NAMESPACE}/{POD}"
    cookies = {"cxygpt_console": client.cookies["cxygpt_console"]}
    log_file = stack["logs"] / NAMESPACE / POD / "engine.log"
    with httpx.stream("GET", url, cookies=cookies, timeout=30) as r:
        assert r.status_code == 200
        batches, quiet = [], False
        for line in r.iter_lines():
            if line.startswith("data: "):
                batches.append(json.loads(line[6:]))
                if len(batches) == 1:  # lines written after the first read arrive once, without the earlier ones
                    with open(log_file, "a") as f:
                        f.write('INFO:     10.0.0.7:40000 - "GET /v1/models HTTP/1.1" 200 OK\n'
                                "INFO engine: KV cache usage 3%\n")
            elif line == ": keep-alive" and not quiet:  # a quiet log keeps being followed
                quiet = True
                with open(log_file, "a") as f:
                    f.write("INFO engine: still here\n")
            if sum(len(b["lines"]) for b in batches) >= 4:
                break
    shown = [line for b in batches for line in b["lines"]]
    assert shown == ["INFO engine: loading weights", "INFO engine: ready to serve", "INFO engine: KV cache usage 3%",
                     "INFO engine: still here"]
    assert sum(b["hidden"] for b in batches) == 3 and quiet
    # only the engines of a model: no other pod's log
    other = httpx.get(f"{stack['tokened']}/events/logs/{NAMESPACE}/someone-else", cookies=cookies, timeout=10)
    assert other.status_code == 404


def test_logs_followed_at_once_are_bounded(stack):
    import threading
    cookies = {"cxygpt_console": signed_in(stack["tokened"], TOKEN).cookies["cxygpt_console"]}
    url = f"{stack['tokened']}/events/logs/{NAMESPACE}/{POD}"
    opened, release = threading.Semaphore(0), threading.Event()

    def follow():
        with httpx.stream("GET", url, cookies=cookies, timeout=30) as r:
            assert r.status_code == 200
            lines = r.iter_lines()  # kept: a dropped line iterator closes the response
            next(lines)
            opened.release()
            release.wait(30)
    followers = [threading.Thread(target=follow) for _ in range(16)]
    for t in followers:
        t.start()
    try:
        for _ in followers:
            assert opened.acquire(timeout=20)
        busy = httpx.get(url, cookies=cookies, timeout=10)
        assert busy.status_code == 503 and busy.headers["retry-after"] == "5"
        assert "16 logs are followed at once" in busy.json()["error"]["message"]
    finally:
        release.set()
        for t in followers:
            t.join(timeout=30)
    # the places come back once their viewers leave
    wait_until(lambda: _first_line(url, cookies), timeout=15, what="a log view again")


def _first_line(url: str, cookies: dict) -> bool:
    with httpx.stream("GET", url, cookies=cookies, timeout=10) as r:
        return r.status_code == 200 and bool(next(r.iter_lines(), None))


def test_the_fleet_shows_the_operators_limits_when_the_gateway_cannot_be_read(stack, tmp_path):
    console = start_console(tmp_path, stack["kubeconfig"], f"http://127.0.0.1:{free_port()}")
    try:
        fleet = wait_until(lambda: (lambda t: "Part of this view may be stale" in t and t)(
            httpx.get(console.url + "/", timeout=10).text), timeout=10, what="the gateway's absence said")
        assert "input 50 tokens" in fleet and "from the operator" in fleet
        assert "unknown (the gateway could not be read)" in fleet
    finally:
        console.stop()


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="needs Debian's prometheus (scripts/bootstrap.sh)")
def test_the_charts_come_from_prometheus_when_told_where_it_is(stack, tmp_path):
    from test_prometheus import start_prometheus

    prometheus = start_prometheus(tmp_path, {"gateway": stack["gateway"].removeprefix("http://")})
    console = start_console(tmp_path, stack["kubeconfig"], stack["gateway"], "--prometheus-url", prometheus.url)
    try:
        body = {"model": MODEL, "stream": True, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
        deadline = time.monotonic() + 30

        def charted():
            if time.monotonic() < deadline:  # traffic while Prometheus gathers a few scrapes
                with httpx.stream("POST", stack["gateway"] + "/v1/chat/completions", json=body, timeout=10,
                                  headers={"Authorization": f"Bearer {KEY}"}) as r:
                    r.read()
            series = httpx.get(console.url + "/api/series", timeout=10).json()
            values = series["models"].get(MODEL, {})
            return any(v for v in values.get("rps", []) if v) and any(v for v in values.get("ttft_p95", []) if v)
        wait_until(charted, timeout=40, interval=0.5, what="Prometheus' rates in the console's charts")
        series = httpx.get(console.url + "/api/series", timeout=10).json()
        assert len(series["t"]) == 61 and series["t"][1] - series["t"][0] == 15  # 15 minutes, 15 s steps
    finally:
        console.stop()
        prometheus.stop()


def test_in_a_browser_a_key_signs_in_and_the_playground_uses_it_from_the_browser(stack):
    from playwright.sync_api import expect, sync_playwright

    from browser import accessibility_problems, launch
    with sync_playwright() as p:
        browser = launch(p)
        try:
            page = browser.new_page(viewport={"width": 1366, "height": 768})
            page.goto(stack["keyed"] + "/playground")
            assert page.url.endswith("/login?next=/playground")
            assert accessibility_problems(page) == []
            page.fill("#credential", "sk-wrong")
            page.click("button[type=submit]")
            expect(page.locator("#login-error")).to_have_text("the gateway does not know this API key")
            page.fill("#credential", KEY)
            page.click("button[type=submit]")
            page.wait_for_url(stack["keyed"] + "/playground")
            # the key is the browser's: kept in its storage, sent by the playground, never in the console's cookie
            assert page.evaluate("localStorage.getItem('cxygpt.apiKey')") == KEY
            assert all(KEY not in c["value"] for c in page.context.cookies())
            expect(page.locator("#model option")).to_have_text([MODEL])
            expect(page.locator("#limits-line")).to_contain_text("your key: team-gold (gold)")
            assert accessibility_problems(page) == []
        finally:
            browser.close()
