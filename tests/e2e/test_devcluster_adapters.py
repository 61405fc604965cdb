"""End to end, LoRA adapters on `cxygpt-dev up --control-plane real`: one ModelDeployment serves its base and two
adapters of the dev Hub on two engine replicas; under steady load (the openai SDK at each engine pod, through the API
server's pod proxy) an adapter is added and another removed: nothing restarts, no request fails, the new one answers
within seconds, the removed one is refused only after the change; a bad adapter is Failed with the engine's own
message while the base keeps serving; a replica added later is Ready only with its adapters loaded."""
import base64
import ssl
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from test_devcluster import Dev

from harness import wait_until

pytestmark = pytest.mark.timeout(420)
SQL = {"name": "lora-sql", "source": "hf://cxygpt-demo/qwen3-0.6b-sql-lora"}
SUPPORT = {"name": "lora-support", "source": "hf://cxygpt-demo/qwen3-0.6b-support-lora"}
SQL2 = {"name": "lora-sql-2", "source": "hf://cxygpt-demo/qwen3-0.6b-sql-lora"}  # the same files, a new name
BAD = {"name": "lora-bad", "source": "hf://cxygpt-demo/no-such-lora"}


def adapters_md(adapters):
    return {"apiVersion": "cxygpt.io/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": "lora", "namespace": "default"},
            "spec": {"model": {"name": "lora-base", "source": "hf://Qwen/Qwen3-0.6B"}, "adapters": adapters,
                     "lora": {"maxRank": 16, "maxLoras": 2}, "replicas": 2,
                     "engine": {"kind": "sim", "env": [{"name": "CXYGPT_SIM_ITL_MS", "value": "20"}]}}}


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    d = Dev(tmp_path_factory.mktemp("dev-lora"))
    yield d
    d.stop()
    assert d.leftovers() == [] and d.proc.returncode == 0


def proxy_clients(dev, tmp: Path, pods) -> dict[str, openai.OpenAI]:
    """An openai client per engine pod, through the API server's pod proxy with the admin's certificate."""
    config = yaml.safe_load(Path(dev.kubeconfig).read_text())
    user, cluster = config["users"][0]["user"], config["clusters"][0]["cluster"]
    files = {}
    for key, field in (("ca", cluster["certificate-authority-data"]), ("crt", user["client-certificate-data"]),
                       ("key", user["client-key-data"])):
        files[key] = tmp / f"admin.{key}"
        files[key].write_bytes(base64.b64decode(field))
    # the API server authenticates the certificate; the SDK's bearer key (the engines ask for none) would be refused
    tls = ssl.create_default_context(cafile=str(files["ca"]))
    tls.load_cert_chain(str(files["crt"]), str(files["key"]))
    http = httpx.Client(verify=tls, timeout=30,
                        event_hooks={"request": [lambda request: request.headers.pop("Authorization", None)]})
    return {pod: openai.OpenAI(base_url=f"{dev.api}/api/v1/namespaces/default/pods/{pod}:8000/proxy/v1",
                               api_key="none", max_retries=0, http_client=http) for pod in pods}


def engine_pods(dev) -> dict[str, tuple[str, int]]:
    """name → (uid, the engine container's restart count) of the model's running pods."""
    pods = dev.kubectl("get", "pods", "-l", "app.kubernetes.io/instance=lora", "-o", "json").stdout
    return {p["metadata"]["name"]: (p["metadata"]["uid"], p["status"]["containerStatuses"][0]["restartCount"])
            for p in yaml.safe_load(pods)["items"] if not p["metadata"].get("deletionTimestamp")}


def adapters_status(dev) -> dict[str, dict]:
    return {a["name"]: a for a in (dev.md("lora").get("status") or {}).get("adapters") or []}


def all_loaded(dev, names, replicas=2, exact=True):
    found = adapters_status(dev)
    return (set(found) == set(names) if exact else set(found) >= set(names)) and all(
        found[n]["phase"] == "Loaded" and found[n]["loadedReplicas"] == replicas == found[n]["replicas"]
        for n in names) and found


class Load:
    """Chat requests in a loop for each (pod, model), one at a time each; every answer recorded with its time."""

    def __init__(self, clients, models):
        self.results: list[tuple[float, str, str, object]] = []  # (time, pod, model, "ok" | the error)
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(c, pod, m), daemon=True)
                        for pod, c in clients.items() for m in models]
        for t in self.threads:
            t.start()

    def _run(self, client, pod, model):
        while not self.stop.is_set():
            try:
                reply = client.chat.completions.create(model=model, max_tokens=8,
                                                       messages=[{"role": "user", "content": "hi"}])
                assert reply.model == model and reply.choices[0].message.content
                outcome: object = "ok"
            except openai.APIStatusError as e:
                outcome = e.status_code
            except Exception as e:  # noqa: BLE001 - every failure is recorded and asserted on
                outcome = repr(e)
            self.results.append((time.monotonic(), pod, model, outcome))

    def end(self):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)

    def of(self, model):
        return [r for r in self.results if r[2] == model]


def test_adapters_are_loaded_added_and_removed_under_load_without_restarts(dev, tmp_path):
    dev.apply(adapters_md([SQL, SUPPORT]))
    status = dev.wait_phase("lora", timeout=120)
    assert status["ready"] == "2/2"
    wait_until(lambda: all_loaded(dev, ["lora-sql", "lora-support"]), timeout=60, interval=0.5, what="both adapters Loaded 2/2")
    args = status["engineArgs"]
    assert args[args.index("--max-loras") + 1] == "2" and "--enable-lora" in args
    before = engine_pods(dev)
    assert len(before) == 2
    clients = proxy_clients(dev, tmp_path, before)
    for client in clients.values():  # each engine lists the base and both adapters, with the base as their parent
        cards = {m.id: getattr(m, "parent", None) for m in client.models.list().data}
        assert cards == {"lora-base": None, "lora-sql": "lora-base", "lora-support": "lora-base"}

    load = Load(clients, ["lora-base", "lora-sql", "lora-support", "lora-sql-2"])
    try:
        wait_until(lambda: sum(r[3] == "ok" for r in load.of("lora-support")) >= 4, timeout=60,
                   what="load flowing")
        changed = time.monotonic()
        dev.apply(adapters_md([SQL, SQL2]))  # lora-support removed, lora-sql-2 added
        wait_until(lambda: all(any(r[1] == pod and r[3] == "ok" and r[0] > changed for r in load.of("lora-sql-2"))
                               for pod in clients), timeout=30, what="the new adapter answering on both engines")
        answered = time.monotonic() - changed
        wait_until(lambda: all(any(r[1] == pod and r[3] == 404 and r[0] > changed for r in load.of("lora-support"))
                               for pod in clients), timeout=30, what="the removed adapter refused on both engines")
        wait_until(lambda: all_loaded(dev, ["lora-sql", "lora-sql-2"]), timeout=30, interval=0.5, what="status follows")
        settled = time.monotonic()  # and some more load after it settled
        wait_until(lambda: sum(r[0] > settled and r[3] == "ok" for r in load.of("lora-sql-2")) >= 4, timeout=30,
                   what="load after the change")
    finally:
        load.end()
    print(f"lora-sql-2 answered on both engines {answered:.1f} s after the apply")
    assert answered < 20
    # no request lost: the base and the kept adapter never failed; the removed one answered until the change and
    # only 404 (vLLM's unknown model) after it; the new one only 404 before it was loaded
    for model in ("lora-base", "lora-sql"):
        assert {r[3] for r in load.of(model)} == {"ok"}, [r for r in load.of(model) if r[3] != "ok"][:3]
    support = load.of("lora-support")
    assert {r[3] for r in support} <= {"ok", 404} and all(r[3] == "ok" for r in support if r[0] < changed)
    assert {r[3] for r in load.of("lora-sql-2")} <= {"ok", 404}
    assert all(r[3] == 404 for r in load.of("lora-sql-2") if r[0] < changed)
    assert engine_pods(dev) == before  # the same pods, never restarted

    # a bad adapter: Failed with the engine's own message; the base and the others keep serving
    dev.apply(adapters_md([SQL, SQL2, BAD]))
    bad = wait_until(lambda: adapters_status(dev).get("lora-bad", {}).get("phase") == "Failed"
                     and adapters_status(dev)["lora-bad"], timeout=30, interval=0.5, what="the bad adapter Failed")
    assert bad["reason"] == "AdapterLoadFailed" and bad["loadedReplicas"] == 0
    assert "No adapter found for cxygpt-demo/no-such-lora" in bad["message"], bad
    assert all_loaded(dev, ["lora-sql", "lora-sql-2", "lora-bad"]) is False
    assert {n: adapters_status(dev)[n]["phase"] for n in ("lora-sql", "lora-sql-2")} == {"lora-sql": "Loaded",
                                                                                        "lora-sql-2": "Loaded"}
    assert dev.md("lora")["status"]["phase"] == "Ready"
    for client in clients.values():
        assert client.chat.completions.create(model="lora-base", max_tokens=4,
                                              messages=[{"role": "user", "content": "hi"}]).choices
    events = dev.kubectl("get", "events", "--field-selector", "involvedObject.name=lora,reason=AdapterLoadFailed",
                         "-o", "json").stdout
    assert any("lora-bad" in e["message"] for e in yaml.safe_load(events)["items"])
    assert engine_pods(dev) == before

    # a replica that starts later is Ready only once its engine has them all (the pods' readiness gate)
    dev.kubectl("scale", "md", "lora", "--replicas=3")
    new = wait_until(lambda: [p for p in pod_objects(dev) if p["metadata"]["uid"] not in {u for u, _ in
                                                                                          before.values()}
                              and condition(p, "Ready") == "True"], timeout=60, interval=0.2, what="a third pod Ready")
    [pod] = new
    cards = proxy_clients(dev, tmp_path, [pod["metadata"]["name"]])[pod["metadata"]["name"]].models.list().data
    assert {m.id for m in cards} == {"lora-base", "lora-sql", "lora-sql-2"}
    gate = next(c for c in pod["status"]["conditions"] if c["type"] == "cxygpt.io/adapters-loaded")
    ready = next(c for c in pod["status"]["conditions"] if c["type"] == "Ready")
    assert gate["status"] == "True" and ready["lastTransitionTime"] >= gate["lastTransitionTime"]
    wait_until(lambda: all_loaded(dev, ["lora-sql", "lora-sql-2"], replicas=3, exact=False), timeout=30, interval=0.5,
               what="status 3/3")
    assert adapters_status(dev)["lora-bad"]["phase"] == "Failed"
    assert {k: v for k, v in engine_pods(dev).items() if k in before} == before


def pod_objects(dev) -> list[dict]:
    return yaml.safe_load(dev.kubectl("get", "pods", "-l", "app.kubernetes.io/instance=lora", "-o", "json").stdout
                          )["items"]


def condition(pod, kind):
    return next((c["status"] for c in (pod.get("status") or {}).get("conditions") or [] if c["type"] == kind), None)


def test_through_the_gateway_adapters_are_served_added_and_removed_under_load(dev):
    """The gateway routes each adapter to the replicas that have it loaded: the same changes under load through it
    lose no request and restart nothing."""
    dev.apply({**adapters_md([SQL, SUPPORT]), "metadata": {"name": "lora", "namespace": "default"}})
    wait_until(lambda: all_loaded(dev, ["lora-sql", "lora-support"], replicas=adapters_md([])["spec"]["replicas"]),
               timeout=90, interval=0.5, what="both adapters Loaded")
    wait_until(lambda: {"lora-base", "lora-sql", "lora-support"} <= dev.models(), timeout=30,
               what="the gateway lists the base and its adapters")
    before = engine_pods(dev)
    load = Load({"gateway": dev.client}, ["lora-base", "lora-sql", "lora-support", "lora-sql-2"])
    try:
        wait_until(lambda: sum(r[3] == "ok" for r in load.of("lora-support")) >= 4, timeout=60, what="load flowing")
        changed = time.monotonic()
        dev.apply(adapters_md([SQL, SQL2]))
        wait_until(lambda: any(r[3] == "ok" and r[0] > changed for r in load.of("lora-sql-2")), timeout=30,
                   what="the new adapter answering through the gateway")
        answered = time.monotonic() - changed
        wait_until(lambda: any(r[3] == 404 and r[0] > changed for r in load.of("lora-support")), timeout=30,
                   what="the removed adapter unknown to the gateway")
        settled = time.monotonic()
        wait_until(lambda: sum(r[0] > settled and r[3] == "ok" for r in load.of("lora-sql-2")) >= 4, timeout=30,
                   what="load after the change")
    finally:
        load.end()
    print(f"through the gateway: lora-sql-2 answered {answered:.1f} s after the apply")
    for model in ("lora-base", "lora-sql"):
        assert {r[3] for r in load.of(model)} == {"ok"}, [r for r in load.of(model) if r[3] != "ok"][:3]
    support = load.of("lora-support")
    assert all(r[3] == "ok" for r in support if r[0] < changed) and {r[3] for r in support} <= {"ok", 404}
    assert {r[3] for r in load.of("lora-sql-2") if r[0] > settled} == {"ok"}
    assert {k: v for k, v in engine_pods(dev).items() if k in before} == before


def inside_hub(dev) -> str:
    """The Hub as pods reach it: the operator's --hf-endpoint."""
    deployments = yaml.safe_load(dev.kubectl("get", "deployments", "-A", "-o", "json").stdout)["items"]
    args = [a for d in deployments for c in d["spec"]["template"]["spec"]["containers"] for a in c.get("args") or []]
    return next(a.split("=", 1)[1] for a in args if a.startswith("--hf-endpoint="))


def fill_claim(dev, claim: str, repo: str):
    """A user's claim with an adapter's files on it, put there by a Job of their own (here the operator image's
    loader, as any download would)."""
    dev.apply({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": claim, "namespace": "default"},
               "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}})
    dev.apply({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": f"fill-{claim}", "namespace": "default"},
               "spec": {"backoffLimit": 0, "template": {"spec": {
                   "restartPolicy": "Never",
                   "containers": [{"name": "fill", "image": "cxygpt/cxygpt-operator:0.1.0",
                                   "command": ["cxygpt-cache-load"], "args": ["--repo", repo, "--dir", "/data"],
                                   "env": [{"name": "HF_ENDPOINT", "value": inside_hub(dev)},
                                           {"name": "HF_HOME", "value": "/data/.hf-home"}],
                                   "volumeMounts": [{"name": "data", "mountPath": "/data"}]}],
                   "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": claim}}]}}}})
    dev.kubectl("wait", "--for=condition=Complete", f"job/fill-{claim}", "--timeout=60s")


def test_pinned_and_claim_adapters_on_offline_engines_load_without_restarts(dev):
    """With the model cache on, the engines run offline. An adapter on a user's claim loads from its pvc:// path; a
    Hub adapter pinned to a commit, added later, is downloaded once into the model's adapter cache by a Job and
    loaded from there without a restart; a revision the Hub does not have is Failed with the download's reason while
    the rest serve; removing an adapter deletes its Job; the model's deletion takes the adapter cache with it."""
    dev.kubectl("delete", "md", "lora", "--ignore-not-found", "--wait=false")
    repo = "cxygpt-demo/qwen3-0.6b-sql-lora"
    sha = httpx.get(f"{dev.hub}/api/models/{repo}/revision/main", timeout=10).json()["sha"]
    fill_claim(dev, "team-adapters", "cxygpt-demo/qwen3-0.6b-support-lora")
    on_claim = {"name": "cached-support", "source": "pvc://team-adapters/cxygpt-demo/qwen3-0.6b-support-lora"}
    pinned = {"name": "cached-sql", "source": f"hf://{repo}@{sha}"}
    missing = {"name": "cached-missing", "source": f"hf://{repo}@{'0' * 40}"}
    body = {"apiVersion": "cxygpt.io/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": "cached", "namespace": "default"},
            "spec": {"model": {"name": "cached-base", "source": "hf://Qwen/Qwen3-0.6B", "cache": {"enabled": True}},
                     "adapters": [on_claim], "engine": {"kind": "sim"}}}
    dev.apply(body)
    dev.wait_phase("cached", timeout=120)

    def status():
        return {a["name"]: a for a in (dev.md("cached").get("status") or {}).get("adapters") or []}

    wait_until(lambda: status().get("cached-support", {}).get("phase") == "Loaded", timeout=60, interval=0.5,
               what="the claim's adapter Loaded")
    pods = {p["metadata"]["uid"]: p["status"]["containerStatuses"][0]["restartCount"]
            for p in yaml.safe_load(dev.kubectl("get", "pods", "-l", "app.kubernetes.io/instance=cached", "-o",
                                                "json").stdout)["items"]}
    body["spec"]["adapters"] = [on_claim, pinned, missing]
    dev.apply(body)
    found = wait_until(lambda: (s := status()).get("cached-sql", {}).get("phase") == "Loaded"
                       and s.get("cached-missing", {}).get("phase") == "Failed" and s, timeout=90, interval=0.5,
                       what="the pinned adapter Loaded, the missing revision Failed")
    assert found["cached-missing"]["reason"] == "RevisionNotFound", found["cached-missing"]
    assert found["cached-support"]["phase"] == "Loaded"
    for model in ("cached-base", "cached-sql", "cached-support"):
        wait_until(lambda m=model: m in dev.models(), timeout=30, what=f"the gateway lists {model}")
        reply = dev.client.chat.completions.create(model=model, max_tokens=4,
                                                   messages=[{"role": "user", "content": "hi"}])
        assert reply.model == model and reply.choices[0].message.content
    after = {p["metadata"]["uid"]: p["status"]["containerStatuses"][0]["restartCount"]
             for p in yaml.safe_load(dev.kubectl("get", "pods", "-l", "app.kubernetes.io/instance=cached", "-o",
                                                 "json").stdout)["items"] if not p["metadata"].get("deletionTimestamp")}
    assert after == pods  # the same pods, not restarted

    def jobs():
        listed = dev.kubectl("get", "jobs", "-l", "cxygpt.io/adapter-cache", "-o", "json").stdout
        return {j["metadata"]["annotations"]["cxygpt.io/revision"]: j for j in yaml.safe_load(listed)["items"]}

    assert set(jobs()) == {sha, "0" * 40}
    body["spec"]["adapters"] = [on_claim, pinned]
    dev.apply(body)
    wait_until(lambda: set(jobs()) == {sha} and set(status()) == {"cached-support", "cached-sql"}, timeout=30,
               what="the missing revision's Job deleted")
    claims = dev.kubectl("get", "pvc", "-l", "cxygpt.io/adapter-cache", "-o", "name").stdout.split()
    assert len(claims) == 1
    dev.kubectl("delete", "md", "cached", "--wait=false")
    wait_until(lambda: not dev.kubectl("get", "pvc,jobs", "-l", "cxygpt.io/adapter-cache", "-o", "name"
                                       ).stdout.split(), timeout=90, what="the adapter cache collected with its model")


def test_an_adapter_cache_over_the_namespaces_quota_never_keeps_the_base_from_serving(dev):
    """A ResourceQuota that allows the weights' claim but not the adapter cache's: the engines start without the
    adapter cache, the base is Ready, and the Hub adapter is Failed with the API server's refusal."""
    ns = "lora-quota"
    dev.kubectl("create", "namespace", ns)
    dev.apply({"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "one-claim", "namespace": ns},
               "spec": {"hard": {"persistentvolumeclaims": "1"}}})
    wait_until(lambda: "persistentvolumeclaims" in (yaml.safe_load(dev.kubectl(
        "get", "resourcequota", "one-claim", "-n", ns, "-o", "json").stdout).get("status") or {}).get("used", {}),
               timeout=30, what="the quota counted by its controller")
    dev.apply({"apiVersion": "cxygpt.io/v1alpha1", "kind": "ModelDeployment",
               "metadata": {"name": "quota", "namespace": ns},
               "spec": {"model": {"name": "quota-base", "source": "hf://Qwen/Qwen3-0.6B", "cache": {"enabled": True}},
                        "adapters": [{"name": "quota-sql", "source": SQL["source"]}], "engine": {"kind": "sim"}}})

    def md():
        return yaml.safe_load(dev.kubectl("get", "md", "quota", "-n", ns, "-o", "json").stdout)

    try:
        wait_until(lambda: (md().get("status") or {}).get("phase") == "Ready", timeout=120, what="the base Ready")
    except AssertionError:
        raise AssertionError(f"not Ready: {md().get('status')}") from None
    [entry] = wait_until(lambda: [a for a in md()["status"].get("adapters") or [] if a["phase"] == "Failed"],
                         timeout=30, what="the adapter Failed")
    assert entry["reason"] == "AdapterCacheRejected" and "exceeded quota" in entry["message"], entry
    dev.kubectl("delete", "namespace", ns, "--wait=false")
