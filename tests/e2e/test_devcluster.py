"""End to end: `cxygpt-dev up` (API, operator, pod runner, engines, gateway) driven with kubectl and the openai SDK."""
import json
import os
import signal
import subprocess
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from harness import REPO, console_script, free_port, wait_until

pytestmark = pytest.mark.timeout(240)


class Dev:
    def __init__(self, tmp: Path, *args: str, env: dict | None = None):
        self.state = tmp / "state"
        self.gateway_port = free_port()
        self.gateway = f"http://127.0.0.1:{self.gateway_port}"
        self.log = open(tmp / "dev.log", "wb")
        self.proc = subprocess.Popen([console_script("cxygpt-dev"), "up", "--no-examples", "--state-dir", str(self.state),
                                      "--gateway-port", str(self.gateway_port), *args],
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp,
                                     env={**os.environ, **(env or {})})
        wait_until(lambda: (self.state / "ready").exists() or self.proc.poll() is not None, timeout=60,
                   what="cxygpt-dev ready")
        assert self.proc.poll() is None, (tmp / "dev.log").read_text()
        info = json.loads((self.state / "ready").read_text())
        self.kubeconfig, self.api = info["kubeconfig"], info["api"]
        self.hub, self.hub_root = info.get("hub"), Path(info["hub_root"]) if info.get("hub_root") else None
        self.client = openai.OpenAI(base_url=self.gateway + "/v1", api_key="none", max_retries=0, timeout=30)

    def kubectl(self, *args, stdin=None, check=True):
        out = subprocess.run([console_script("kubectl"), "--kubeconfig", self.kubeconfig, "--cache-dir",
                              str(self.state / "kc"), *args], capture_output=True, text=True, input=stdin, timeout=60)
        if check and out.returncode != 0:
            raise AssertionError(f"kubectl {args}: {out.stderr}")
        return out

    def apply(self, doc):
        return self.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(doc))

    def md(self, name):
        return json.loads(self.kubectl("get", "md", name, "-o", "json").stdout)

    def wait_phase(self, name, phase="Ready", timeout=60):
        return wait_until(lambda: (self.md(name).get("status") or {}).get("phase") == phase and self.md(name),
                          timeout=timeout, what=f"{name} {phase}")["status"]

    def models(self):
        return {m["id"] for m in httpx.get(self.gateway + "/v1/models").json()["data"]}

    def engine_ports(self, service):
        slices = json.loads(self.kubectl("get", "endpointslices", "-l", f"kubernetes.io/service-name={service}",
                                         "-o", "json").stdout)["items"]
        return sorted(s["ports"][0]["port"] for s in slices if s["endpoints"][0]["conditions"]["ready"])

    def pids(self, pattern):
        out = subprocess.run(["pgrep", "-f", "--", pattern], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)  # Ctrl-C
            self.proc.wait(timeout=40)
        self.log.close()


def sim_md(name, served, *, mode="multi", replicas=1, env=None, profile="auto"):
    engine = {"kind": "sim", "env": [{"name": k, "value": v} for k, v in (env or {}).items()]}
    return {"apiVersion": "cxygpt.io/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"model": {"name": served, "source": "hf://Qwen/Qwen3-14B",
                               "variants": {"int4": "hf://Qwen/Qwen3-14B-GPTQ-Int4"}},
                     "mode": mode, "profile": profile, "replicas": replicas, "engine": engine}}


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    d = Dev(tmp_path_factory.mktemp("dev"))
    yield d
    d.stop()
    # Ctrl-C leaves nothing behind: no engine, operator, gateway or API process of this run
    assert d.pids(f"--kubeconfig {d.kubeconfig}") == []
    assert d.proc.returncode == 0


def test_apply_chat_and_delete(dev):
    dev.kubectl("apply", "-f", str(REPO / "deploy/crds"))  # already there: unchanged
    dev.apply(sim_md("chat", "chat-model"))
    status = dev.wait_phase("chat")
    assert status["profile"] == "SRV_MULTI_80G" and status["ready"] == "1/1"
    wait_until(lambda: "chat-model" in dev.models(), what="chat-model routed")

    reply = dev.client.chat.completions.create(model="chat-model", max_tokens=16,
                                               messages=[{"role": "user", "content": "hello"}])
    assert reply.choices[0].message.content and reply.usage.completion_tokens > 0
    chunks = list(dev.client.chat.completions.create(model="chat-model", max_tokens=16, stream=True,
                                                     messages=[{"role": "user", "content": "hello"}]))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    row = dev.kubectl("get", "md", "chat", "--no-headers").stdout.split()
    assert row[1:6] == ["chat-model", "SRV_MULTI_80G", "2x79GiB", "1/1", "Ready"]

    port = dev.engine_ports("chat")[0]
    assert dev.pids(f"--port {port}")
    dev.kubectl("delete", "md", "chat", "--timeout=30s")
    wait_until(lambda: "chat-model" not in dev.models(), what="chat-model gone from /v1/models")
    wait_until(lambda: not dev.pids(f"--port {port}"), what="engine process stopped")


def test_profile_follows_hardware(dev):
    dev.apply(sim_md("hw-multi", "hw-multi"))
    dev.apply(sim_md("hw-single", "hw-single", mode="single"))
    assert dev.wait_phase("hw-multi")["profile"] == "SRV_MULTI_80G"
    assert dev.wait_phase("hw-single")["profile"] == "SINGLE_32G"

    def engine_max_len(name):
        port = wait_until(lambda: dev.engine_ports(name), what=f"{name} endpoints")[0]
        return httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"][0]["max_model_len"]

    assert engine_max_len("hw-single") == 3072
    assert engine_max_len("hw-multi") == 16384
    try:
        dev.kubectl("delete", "node", "cxygpt-worker2", "cxygpt-worker3")  # the 80 GiB nodes
        wait_until(lambda: (dev.md("hw-multi").get("status") or {}).get("profile") == "DEV_32G", what="DEV_32G")
        status = dev.wait_phase("hw-multi")
        args = json.loads(dev.kubectl("get", "deployment", "hw-multi", "-o", "json").stdout)[
            "spec"]["template"]["spec"]["containers"][0]["args"]
        assert args[0] == "Qwen/Qwen3-14B-GPTQ-Int4" and args[args.index("--max-model-len") + 1] == "4096"
        assert status["engineArgs"] == args
        wait_until(lambda: engine_max_len("hw-multi") == 4096, what="engine restarted with 4096")
    finally:
        nodes = yaml.safe_load((REPO / "kind-config.yaml").read_text())["nodes"]
        for i, name in ((2, "cxygpt-worker2"), (3, "cxygpt-worker3")):
            dev.apply({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": nodes[i]["labels"]}})
        dev.kubectl("delete", "md", "hw-multi", "hw-single", "--timeout=30s")


def test_limits_end_to_end(dev):
    # DEV_32G-sized limits come with the profile; force it so the numbers are known
    dev.apply(sim_md("lim", "lim", profile="DEV_32G"))
    dev.apply(sim_md("solo", "solo", mode="single", env={"CXYGPT_SIM_ITL_MS": "100"}))
    dev.wait_phase("lim")
    dev.wait_phase("solo")
    wait_until(lambda: {"lim", "solo"} <= dev.models(), what="routes")
    try:
        with pytest.raises(openai.APIStatusError) as err:
            dev.client.completions.create(model="lim", prompt="word " * 5000, max_tokens=8)
        assert err.value.status_code == 413 and "3840" in err.value.message

        codes = []
        with httpx.Client(timeout=10) as http:
            for _ in range(15):  # 5 QPS allowed
                r = http.post(dev.gateway + "/v1/completions", json={"model": "lim", "prompt": "hi", "max_tokens": 1})
                codes.append(r.status_code)
                if r.status_code == 429:
                    assert int(r.headers["Retry-After"]) >= 1 and r.json()["error"]["code"] is not None
        assert 429 in codes and codes[0] == 200

        # single-user: one running, one queued, the third is refused at once
        import concurrent.futures
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            def slow():
                with httpx.Client(timeout=30) as http:
                    return http.post(dev.gateway + "/v1/completions",
                                     json={"model": "solo", "prompt": "hi", "max_tokens": 20})
            futures = [pool.submit(slow) for _ in range(3)]
            results = [f.result() for f in futures]
        refused = [r for r in results if r.status_code == 503]
        assert len(refused) >= 1 and "Retry-After" in refused[0].headers
        assert sum(r.status_code == 200 for r in results) >= 1
    finally:
        dev.kubectl("delete", "md", "lim", "solo", "--timeout=30s")


def test_an_embedding_model_serves_embeddings_through_the_gateway(dev):
    md = sim_md("embedder", "embedder")
    md["spec"]["model"]["task"] = "embed"
    dev.apply(md)
    try:
        dev.wait_phase("embedder")
        assert "--runner" in dev.md("embedder")["status"]["engineArgs"]
        wait_until(lambda: "embedder" in dev.models(), what="embedder routed")
        reply = dev.client.embeddings.create(model="embedder", input=["first text", "second text"])
        assert len(reply.data) == 2 and len(reply.data[0].embedding) > 0 and reply.usage.prompt_tokens > 0
        with pytest.raises(openai.BadRequestError):  # text to an embedding model: refused by the gateway
            dev.client.chat.completions.create(model="embedder", messages=[{"role": "user", "content": "hi"}])
    finally:
        dev.kubectl("delete", "md", "embedder", "--timeout=30s")


def test_faults(dev, tmp_path):
    dev.apply(sim_md("ha", "ha", replicas=2, env={"CXYGPT_SIM_ITL_MS": "50"}))
    dev.wait_phase("ha")
    wait_until(lambda: len(dev.engine_ports("ha")) == 2, what="two engines")
    try:
        # an engine killed mid-stream: the client gets an error event; the next request goes to the other replica
        ports = dev.engine_ports("ha")
        stream = dev.client.chat.completions.create(model="ha", max_tokens=200, stream=True,
                                                    messages=[{"role": "user", "content": "long"}])
        first = next(iter(stream))
        assert first is not None
        victims = [p for port in ports for p in dev.pids(f"--port {port}")]
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        with pytest.raises(openai.APIError):
            for _ in stream:
                pass
        wait_until(lambda: dev.client.chat.completions.create(
            model="ha", max_tokens=4, messages=[{"role": "user", "content": "again"}]).choices, timeout=30,
            what="served again after engine restart")

        # operator killed and restarted: converges, no duplicate objects
        [operator] = dev.pids(f"cxygpt-operator --kubeconfig {dev.kubeconfig}")
        os.kill(operator, signal.SIGKILL)
        dev.kubectl("patch", "md", "ha", "--type=merge", "-p", '{"spec": {"replicas": 3}}')
        port = free_port()
        with open(tmp_path / "operator2.log", "wb") as log:
            op = subprocess.Popen([console_script("cxygpt-operator"), "--kubeconfig", dev.kubeconfig, "--liveness",
                                   f"http://127.0.0.1:{port}/healthz", "--metrics-port", "0"],
                                  stdout=log, stderr=subprocess.STDOUT)
            try:
                wait_until(lambda: dev.md("ha")["status"].get("replicas") == 3 and dev.md("ha")["status"]["phase"] == "Ready",
                           timeout=60, what="converged to 3 replicas")
                assert dev.kubectl("get", "deployments", "-o", "name").stdout.split().count("deployment.apps/ha") == 1
                assert dev.kubectl("get", "services", "-o", "name").stdout.split().count("service/ha") == 1
            finally:
                op.terminate()
                op.wait(timeout=20)

        # a new gateway process recovers every route from the API
        port = free_port()
        with open(tmp_path / "gateway2.log", "wb") as log:
            gw = subprocess.Popen([console_script("cxygpt-gateway"), "--kubernetes", "--kubeconfig", dev.kubeconfig,
                                   "--host", "127.0.0.1", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
            try:
                wait_until(lambda: "ha" in {m["id"] for m in httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"]},
                           timeout=30, what="routes recovered")
                assert httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200
            finally:
                gw.terminate()
                gw.wait(timeout=20)
    finally:
        dev.kubectl("delete", "md", "ha", "--timeout=30s", check=False)


def test_detached_run_and_down(tmp_path):
    state, port = tmp_path / "state", free_port()
    up = subprocess.run([console_script("cxygpt-dev"), "up", "--detach", "--no-examples", "--state-dir", str(state),
                         "--gateway-port", str(port)], capture_output=True, text=True, timeout=90, cwd=tmp_path)
    assert up.returncode == 0, up.stdout + up.stderr + (state / "detached.log").read_text()
    assert "up in the background" in up.stdout
    kubeconfig = json.loads((state / "ready").read_text())["kubeconfig"]
    assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
    log = (state / "cxygpt-dev.log").read_text()
    assert "[kubeapi]" in log and "[operator]" in log and "[gateway]" in log  # every component, one place
    down = subprocess.run([console_script("cxygpt-dev"), "down", "--state-dir", str(state)], capture_output=True,
                          text=True, timeout=60)
    assert down.returncode == 0 and "stopped" in down.stdout
    left = subprocess.run(["pgrep", "-f", "--", f"--kubeconfig {kubeconfig}"], capture_output=True, text=True).stdout
    assert left.strip() == ""
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/healthz")

