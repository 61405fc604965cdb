"""The operator's adapter loop (one pass of adapter_sync) against a real API server and two real `cxygpt-sim` engines
that download adapters from the local Hub: what each engine lacks is loaded and what was removed unloaded, an engine's
refusal is Failed with its words, a name another model serves is never loaded, status.adapters is written, and each
pod's readiness gate opens once it has every adapter."""
from __future__ import annotations

import asyncio
import json
import sys

import aiohttp
import httpx
import pytest

from cxygpt_operator.adapter_cache import Loader
from cxygpt_operator.adapter_sync import sync
from cxygpt_operator.adapters import ADAPTERS_GATE, Memory
from cxygpt_operator.kube import Kube, api_client
from cxygpt_operator.resolve import NameClaim
from harness import REPO, ServerProcess, console_script, free_port

pytestmark = pytest.mark.timeout(240)
SQL = {"name": "sql", "source": "hf://cxygpt-demo/qwen3-0.6b-sql-lora"}
SUPPORT = {"name": "support", "source": "hf://cxygpt-demo/qwen3-0.6b-support-lora"}
LABELS = {"app.kubernetes.io/name": "cxygpt-engine", "app.kubernetes.io/instance": "lora"}


@pytest.fixture(scope="module")
def engines(cluster, tmp_path_factory):
    """Two simulators (rank at most 8: the support adapter's 16 is refused) reading adapters from a local Hub, on the
    cluster's own address (an EndpointSlice may not publish a loopback one)."""
    host = cluster.plan.host
    root = tmp_path_factory.mktemp("engines")
    hub_port = free_port()
    hub = ServerProcess([sys.executable, "-m", "cxygpt_dev.hub", "--root", str(root / "hub"), "--port", str(hub_port),
                         "--catalog-stand-ins", "1"], port=hub_port, log_path=root / "hub.log")
    ports = [free_port(), free_port()]
    sims = [ServerProcess([console_script("cxygpt-sim"), "serve", "Qwen/Qwen3-0.6B", "--served-model-name", "base",
                           "--host", host, "--port", str(port), "--speed-profile", "fast", "--enable-lora",
                           "--max-loras", "2", "--max-lora-rank", "8"], port=port, log_path=root / f"sim{i}.log",
                          host=host, env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "HF_ENDPOINT": f"http://127.0.0.1:{hub_port}",
                               "HF_HOME": str(root / f"hf{i}")}) for i, port in enumerate(ports)]
    with hub, sims[0], sims[1]:
        yield host, ports


@pytest.fixture
def model(kube, engines):
    host, ports = engines
    """A ModelDeployment and two engine pods (that no node takes: their status is written here, as a kubelet would) that
    its Service's EndpointSlice publishes at the simulators' ports."""
    kube("apply", "-f", str(REPO / "deploy" / "crds"))
    kube.wait_established("modeldeployments.cxygpt.io")
    pods = []
    for i in range(2):
        kube.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"lora-{i}", "labels": LABELS},
                    "spec": {"nodeSelector": {"cxygpt.io/no-such-node": "x"},
                             "readinessGates": [{"conditionType": ADAPTERS_GATE}],
                             "containers": [{"name": "engine", "image": "sim"}]}})
        kube("patch", "pod", f"lora-{i}", "--subresource=status", "--type=merge", "-p",
             json.dumps({"status": {"phase": "Running", "podIP": host, "podIPs": [{"ip": host}]}}))
        pods.append(kube.get("pod", f"lora-{i}"))
    kube.apply(*[{"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": f"lora-{i}", "labels": {"kubernetes.io/service-name": "lora"}},
                "addressType": "IPv4", "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
                "endpoints": [{"addresses": [host], "conditions": {"ready": False},
                               "targetRef": {"kind": "Pod", "name": pod["metadata"]["name"],
                                             "uid": pod["metadata"]["uid"]}}]}
                 for i, (pod, port) in enumerate(zip(pods, ports, strict=True))])
    return kube


def md(kube, adapters):
    kube.apply({"apiVersion": "cxygpt.io/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": "lora"},
                "spec": {"model": {"name": "base", "source": "hf://Qwen/Qwen3-0.6B"}, "adapters": adapters,
                         "engine": {"kind": "sim"}}})
    return kube.get("md", "lora")


async def passes(kube, memory, body, base_claims=None, calls=None):
    client = Kube(api_client(str(kube.kubeconfig)))
    async with aiohttp.ClientSession() as session:
        return await sync(body, kube=client, session=session, port=1, memory=memory, base_claims=base_claims or {},
                          adapter_index={}, written=None, loader=Loader("loader", None, "1Gi", 600, 0),
                          counted=lambda action, ok: (calls if calls is not None else []).append((action, ok)))


def engine_adapters(host, port):
    return {m["id"] for m in httpx.get(f"http://{host}:{port}/v1/models").json()["data"] if m.get("parent")}


def test_one_pass_loads_refuses_unloads_and_opens_the_gates(model, engines):
    kube, memory, (host, ports) = model, Memory(), engines
    calls = []
    done = asyncio.run(passes(kube, memory, md(kube, [SQL, SUPPORT]), calls=calls))
    assert done.calls == 4  # each adapter on each engine
    assert sorted(calls) == [("load", False), ("load", False), ("load", True), ("load", True)]
    assert [engine_adapters(host, p) for p in ports] == [{"sql"}, {"sql"}]
    status = {a["name"]: a for a in kube.get("md", "lora")["status"]["adapters"]}
    assert (status["sql"]["phase"], status["sql"]["loadedReplicas"], status["sql"]["replicas"]) == ("Loaded", 2, 2)
    assert status["support"]["phase"] == "Failed" and status["support"]["reason"] == "AdapterLoadFailed"
    assert "LoRA rank 16 is greater than max_lora_rank 8." in status["support"]["message"], status
    assert [f[0] for f in done.failed] == ["support"]  # reported once, as an Event by the loop
    assert kube.get("md", "lora")["status"]["adaptersLoaded"] == "1/2"
    wide = kube("get", "md", "lora", "-o", "wide").splitlines()
    assert wide[1][wide[0].index("ADAPTERS"):].split()[0] == "1/2", wide  # kubectl get -o wide's column
    for i in range(2):  # every adapter loaded or refused: the gate opens; the others' conditions (the scheduler's) stay
        conditions = {c["type"]: c["status"] for c in kube.get("pod", f"lora-{i}")["status"].get("conditions") or []}
        assert conditions.get(ADAPTERS_GATE) == "True" and conditions.get("PodScheduled") == "False"
    # a refused adapter is not tried again at once: the next pass makes no call
    assert asyncio.run(passes(kube, memory, kube.get("md", "lora"))).calls == 0

    # support removed, sql taken by another model's served name: both gone from the engines, sql Failed
    body = md(kube, [{"name": "sql", "source": SQL["source"]}])
    claims = {"sql": [NameClaim("2026-01-01T00:00:00Z", "other-uid", "team-b", "sql-model")]}
    done = asyncio.run(passes(kube, memory, body, base_claims=claims))
    assert [engine_adapters(host, p) for p in ports] == [set(), set()]
    [entry] = kube.get("md", "lora")["status"]["adapters"]
    assert entry["phase"] == "Failed" and entry["reason"] == "ModelNameConflict" and "team-b/sql-model" in \
        entry["message"]

    md(kube, [])  # no adapters: status.adapters goes
    asyncio.run(passes(kube, memory, kube.get("md", "lora")))
    assert not {"adapters", "adaptersLoaded"} & set(kube.get("md", "lora").get("status") or {})
