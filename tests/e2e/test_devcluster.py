"""End to end: `cxygpt-dev up --control-plane real` (the real control plane, our kubelets, the chart's operator and
gateway as pods, engines) driven with kubectl and the openai SDK."""
import json
import os
import re
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
        self.state = (tmp / "state").resolve()
        self.gateway_port = free_port()
        self.gateway = f"http://127.0.0.1:{self.gateway_port}"
        self.log = open(tmp / "dev.log", "wb")
        self.proc = subprocess.Popen([console_script("cxygpt-dev"), "up", "--control-plane", "real", "--no-examples",
                                      "--state-dir", str(self.state), "--gateway-port", str(self.gateway_port), *args],
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp,
                                     env={**os.environ, **(env or {})})
        wait_until(lambda: (self.state / "ready").exists() or self.proc.poll() is not None, timeout=150,
                   what="cxygpt-dev ready")
        assert self.proc.poll() is None, (tmp / "dev.log").read_text()
        info = json.loads((self.state / "ready").read_text())
        assert info["control_plane"] == "real"
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

    def engines(self, service, namespace="default") -> dict[str, str]:
        """The Service's ready endpoints as the EndpointSlice controller publishes them: address:port -> pod."""
        slices = json.loads(self.kubectl("get", "endpointslices", "-n", namespace, "-l",
                                         f"kubernetes.io/service-name={service}", "-o", "json").stdout)["items"]
        return {f"{address}:{s['ports'][0]['port']}": e["targetRef"]["name"] for s in slices
                for e in s.get("endpoints") or [] if e["conditions"].get("ready") for address in e["addresses"]}

    def engine_get(self, endpoint: str, path: str, namespace="default") -> dict:
        """A GET to one engine through the API server's pod proxy (the engines' addresses are the cluster's)."""
        pod, port = self.engines_pod(endpoint), endpoint.rsplit(":", 1)[1]
        return json.loads(self.kubectl("get", "--raw", f"/api/v1/namespaces/{namespace}/pods/{pod}:{port}/proxy"
                                       f"{path}").stdout)

    def engines_pod(self, endpoint: str) -> str:
        pods = json.loads(self.kubectl("get", "pods", "-A", "-o", "json").stdout)["items"]
        return next(p["metadata"]["name"] for p in pods if p["status"].get("podIP") == endpoint.rsplit(":", 1)[0])

    def pod_pids(self, pod: str) -> list[int]:
        """The processes of a pod's containers: this cluster's, with the pod's name as their HOSTNAME."""
        return [pid for pid, env in self._environs().items()
                if f"HOSTNAME={pod}" in env and f"CXYGPT_DEV_CLUSTER={self.state}" in env]

    def leftovers(self) -> list[int]:
        """Every process this dev cluster started (they carry its mark), its pods' too."""
        return [pid for pid, env in self._environs().items() if f"CXYGPT_DEV_CLUSTER={self.state}" in env]

    @staticmethod
    def _environs() -> dict[int, list[str]]:
        found = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    found[int(entry.name)] = (entry / "environ").read_bytes().decode(errors="replace").split("\0")
                except OSError:
                    pass
        return found

    def component_pods(self, component: str) -> list[dict]:
        return json.loads(self.kubectl("get", "pods", "-n", "cxygpt", "-l", f"app.kubernetes.io/component={component}",
                                       "-o", "json").stdout)["items"]

    def kill_operator(self) -> int:
        """SIGKILL the operator's process (no clean shutdown); the kubelet restarts its container. The restart
        count it had."""
        [pod] = self.component_pods("operator")
        restarts = pod["status"]["containerStatuses"][0]["restartCount"]
        for pid in self.pod_pids(pod["metadata"]["name"]):
            os.kill(pid, signal.SIGKILL)
        return restarts

    def wait_operator_back(self, restarts: int, timeout: float = 60) -> None:
        def back():
            [pod] = self.component_pods("operator")
            status = pod["status"]["containerStatuses"][0]
            return status["restartCount"] > restarts and status["ready"]
        wait_until(back, timeout=timeout, interval=0.2, what="the operator restarted and ready")

    def claim_dir(self, claim: str, namespace="default") -> Path:
        """A claim's directory: its PersistentVolume's, as the provisioner made it."""
        volume = json.loads(self.kubectl("get", "pvc", claim, "-n", namespace, "-o", "json").stdout)["spec"]["volumeName"]
        return Path(json.loads(self.kubectl("get", "pv", volume, "-o", "json").stdout)["spec"]["hostPath"]["path"])

    def pids(self, pattern):
        out = subprocess.run(["pgrep", "-f", "--", pattern], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)  # Ctrl-C
            self.proc.wait(timeout=90)
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
    # Ctrl-C leaves nothing behind: no engine, operator, gateway, kubelet or control plane process of this run
    assert d.leftovers() == []
    assert d.proc.returncode == 0


def test_apply_chat_and_delete(dev):
    dev.kubectl("apply", "-f", str(REPO / "deploy/crds"))  # already there: unchanged
    dev.apply(sim_md("chat", "chat-model"))
    status = dev.wait_phase("chat")
    assert status["profile"] == "SRV_80G" and status["ready"] == "1/1"  # one of the 80 GB GPUs holds 14B
    wait_until(lambda: "chat-model" in dev.models(), what="chat-model routed")

    reply = dev.client.chat.completions.create(model="chat-model", max_tokens=16,
                                               messages=[{"role": "user", "content": "hello"}])
    assert reply.choices[0].message.content and reply.usage.completion_tokens > 0
    chunks = list(dev.client.chat.completions.create(model="chat-model", max_tokens=16, stream=True,
                                                     messages=[{"role": "user", "content": "hello"}]))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    row = dev.kubectl("get", "md", "chat", "--no-headers").stdout.split()
    assert row[1:6] == ["chat-model", "SRV_80G", "1x79GiB", "1/1", "Ready"]

    [pod] = dev.engines("chat").values()
    assert dev.pod_pids(pod)
    dev.kubectl("delete", "md", "chat", "--timeout=30s")
    wait_until(lambda: "chat-model" not in dev.models(), what="chat-model gone from /v1/models")
    # the garbage collector deletes the Deployment, its ReplicaSet, then the pod, which the kubelet drains and stops
    wait_until(lambda: not dev.pod_pids(pod), timeout=60, what="engine process stopped")


def test_profile_follows_hardware(dev):
    dev.apply(sim_md("hw-multi", "hw-multi"))
    dev.apply(sim_md("hw-single", "hw-single", mode="single"))
    assert dev.wait_phase("hw-multi")["profile"] == "SRV_80G"
    assert dev.wait_phase("hw-single")["profile"] == "SINGLE_80G"

    def engine_max_len(name):
        endpoint = sorted(wait_until(lambda: dev.engines(name), what=f"{name} endpoints"))[0]
        return dev.engine_get(endpoint, "/v1/models")["data"][0]["max_model_len"]

    assert engine_max_len("hw-single") == 40960  # one user on an 80 GB card: Qwen3-14B's whole context
    assert engine_max_len("hw-multi") == 16384
    try:
        dev.kubectl("cordon", "cxygpt-worker2", "cxygpt-worker3")  # the 80 GiB nodes take no new pods
        wait_until(lambda: (dev.md("hw-multi").get("status") or {}).get("profile") == "DEV_32G", what="DEV_32G")
        status = dev.wait_phase("hw-multi")
        args = json.loads(dev.kubectl("get", "deployment", "hw-multi", "-o", "json").stdout)[
            "spec"]["template"]["spec"]["containers"][0]["args"]
        assert args[0] == "Qwen/Qwen3-14B-GPTQ-Int4" and args[args.index("--max-model-len") + 1] == "4096"
        assert status["engineArgs"] == args
        wait_until(lambda: engine_max_len("hw-multi") == 4096, what="engine restarted with 4096")
        wait_until(lambda: (dev.md("hw-single").get("status") or {}).get("profile") == "SINGLE_32G",
                   what="SINGLE_32G on the 32 GB card")
    finally:
        dev.kubectl("uncordon", "cxygpt-worker2", "cxygpt-worker3")
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
    wait_until(lambda: len(dev.engines("ha")) == 2, what="two engines")
    try:
        # an engine killed mid-stream: the client gets an error event; the next request goes to the other replica
        pods = dev.engines("ha").values()
        stream = dev.client.chat.completions.create(model="ha", max_tokens=200, stream=True,
                                                    messages=[{"role": "user", "content": "long"}])
        first = next(iter(stream))
        assert first is not None
        victims = [p for pod in pods for p in dev.pod_pids(pod)]
        assert victims
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        with pytest.raises(openai.APIError):
            for _ in stream:
                pass
        wait_until(lambda: dev.client.chat.completions.create(
            model="ha", max_tokens=4, messages=[{"role": "user", "content": "again"}]).choices, timeout=30,
            what="served again after engine restart")

        # the operator's process killed: its container restarts (the kubelet), and it converges, no duplicate objects
        restarts = dev.kill_operator()
        dev.kubectl("patch", "md", "ha", "--type=merge", "-p", '{"spec": {"replicas": 3}}')
        dev.wait_operator_back(restarts)
        wait_until(lambda: dev.md("ha")["status"].get("replicas") == 3 and dev.md("ha")["status"]["phase"] == "Ready",
                   timeout=60, what="converged to 3 replicas")
        assert dev.kubectl("get", "deployments", "-o", "name").stdout.split().count("deployment.apps/ha") == 1
        assert dev.kubectl("get", "services", "-o", "name").stdout.split().count("service/ha") == 1

        # a new gateway pod (the old one deleted) recovers every route from the API
        [old] = [p["metadata"]["name"] for p in dev.component_pods("gateway")]
        dev.kubectl("delete", "pod", old, "-n", "cxygpt", "--wait=false")
        wait_until(lambda: [p for p in dev.component_pods("gateway") if p["metadata"]["name"] != old and any(
            c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions") or [])],
            timeout=60, what="a new gateway pod ready")
        wait_until(lambda: "ha" in dev.models() and httpx.get(dev.gateway + "/readyz").status_code == 200,
                   timeout=30, what="routes recovered")
    finally:
        dev.kubectl("delete", "md", "ha", "--timeout=30s", check=False)


def test_detached_run_and_down(tmp_path):
    state, port = tmp_path / "state", free_port()
    up = subprocess.run([console_script("cxygpt-dev"), "up", "--control-plane", "real", "--detach", "--no-examples",
                         "--state-dir", str(state), "--gateway-port", str(port)], capture_output=True, text=True,
                        timeout=200, cwd=tmp_path)
    assert up.returncode == 0, up.stdout + up.stderr + (state / "detached.log").read_text()
    assert "up in the background" in up.stdout and "on the real control plane" in up.stdout
    assert "{" not in up.stdout  # words, not a dict
    assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
    kubeconfig = json.loads((state / "ready").read_text())["kubeconfig"]
    version = subprocess.run([console_script("kubectl"), "--kubeconfig", kubeconfig, "version", "-o", "json"],
                             capture_output=True, text=True, timeout=30)
    pinned = re.search(r"^\s*k8s.io/kubernetes (v\S+)", (REPO / "devcluster/kube/go.mod").read_text(), re.M)[1]
    assert json.loads(version.stdout)["serverVersion"]["gitVersion"] == pinned
    log = (state / "cxygpt-dev.log").read_text()
    assert f"Kubernetes {pinned}" in log and "[helm]" in log and "helm installed the chart" in log
    down = subprocess.run([console_script("cxygpt-dev"), "down", "--state-dir", str(state)], capture_output=True,
                          text=True, timeout=120)
    assert down.returncode == 0 and "stopped" in down.stdout
    marked = f"CXYGPT_DEV_CLUSTER={state.resolve()}"
    assert [pid for pid, env in Dev._environs().items() if marked in env] == []
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/healthz")

