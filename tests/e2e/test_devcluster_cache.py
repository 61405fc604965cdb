"""End to end, the model cache on `cxygpt-dev up --control-plane real`: a ModelDeployment with a cache downloads its
weights once through the local Hub with the real huggingface_hub (the download Job's pod a local process, the claim a
local directory the provisioner made), its
engines start from that directory and serve; a download killed in the middle resumes; the last user takes the cache
along."""
import json
import os
import signal
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml
from test_devcluster import Dev as DevCluster

from cxygpt_dev.hub import make_repo
from harness import wait_until

pytestmark = pytest.mark.timeout(240)
MIB = 2**20


class Dev(DevCluster):
    """The dev cluster with its Hub slowed to 8 MiB/s, so a download can be killed in the middle."""

    def __init__(self, tmp: Path):
        super().__init__(tmp, "--hub-rate-mib-s", "8")

    def status(self, name):
        return self.md(name).get("status") or {}

    def stats(self):
        return httpx.get(self.hub + "/_dev/stats").json()


def cached_md(name, repo, *, replicas=1):
    return {"apiVersion": "cxygpt.io/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": name,
                                                                                       "namespace": "default"},
            "spec": {"model": {"name": name, "source": f"hf://{repo}", "cache": {"enabled": True, "size": "1Gi"}},
                     "replicas": replicas, "engine": {"kind": "sim"}}}


def pids(pattern):
    out = subprocess.run(["pgrep", "-f", "--", pattern], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    d = Dev(tmp_path_factory.mktemp("dev-cache"))
    yield d
    d.stop()
    assert d.leftovers() == [] and d.proc.returncode == 0


def test_a_cached_model_downloads_once_through_the_hub_and_serves_from_the_claim(dev):
    make_repo(dev.hub_root, "cxygpt-test/chat", weights_bytes=16 * MIB, shard_bytes=8 * MIB)
    httpx.post(dev.hub + "/_dev/stats/reset")
    dev.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(cached_md("chat", "cxygpt-test/chat", replicas=2)))
    seen = set()

    def ready():
        status = dev.status("chat")
        seen.add((status.get("phase"), (status.get("cache") or {}).get("phase")))
        return status if status.get("phase") == "Ready" else None

    status = wait_until(ready, timeout=90, interval=0.2, what="chat Ready")
    # never Starting before the weights are there (what the status says while it downloads, Pending, is the
    # operator's integration test's: a download of 2 s may end between two looks of a loaded machine)
    assert ("Starting", "Downloading") not in seen, seen
    cache = status["cache"]
    assert cache["phase"] == "Ready" and len(cache["revision"]) == 40 and cache["bytesTotal"] > 16 * MIB
    # two replicas, one download: the weights left the hub once
    weights = sum(v for k, v in dev.stats()["files"].items() if k.endswith(".safetensors"))
    assert weights == 16 * MIB, dev.stats()
    claim_dir = dev.claim_dir(cache["claimName"])
    assert (claim_dir / "cxygpt-test/chat/model-00001-of-00002.safetensors").stat().st_size == 8 * MIB
    assert json.loads((claim_dir / ".cxygpt-cache.json").read_text())["revision"] == cache["revision"]
    # the engines read the claim's directory, offline
    engines = pids(f"{claim_dir}/cxygpt-test/chat")
    assert len(engines) == 2
    assert b"HF_HUB_OFFLINE=1" in Path(f"/proc/{engines[0]}/environ").read_bytes().split(b"\0")
    # the download is visible as a Kubernetes user sees it: a Complete Job and its pod's log
    job = json.loads(dev.kubectl("get", "job", cache["claimName"], "-o", "json").stdout)
    assert job["status"]["succeeded"] == 1 and any(c["type"] == "Complete" for c in job["status"]["conditions"])
    # the engines were made once the download was done, not before
    deployment = json.loads(dev.kubectl("get", "deployment", "chat", "-o", "json").stdout)
    assert deployment["metadata"]["creationTimestamp"] >= job["status"]["completionTime"], (deployment, job)
    assert '"event": "done"' in dev.kubectl("logs", f"job/{cache['claimName']}").stdout

    wait_until(lambda: "chat" in {m["id"] for m in httpx.get(dev.gateway + "/v1/models").json()["data"]},
               what="chat routed")
    reply = dev.client.chat.completions.create(model="chat", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content

    dev.kubectl("delete", "md", "chat", "--timeout=30s")
    # the garbage collector's work, and the claim's protection waits for the engine pods to have stopped
    wait_until(lambda: not dev.kubectl("get", "pvc,job", "-o", "name").stdout.strip(), timeout=60, interval=0.5,
               what="the cache deleted")
    wait_until(lambda: not claim_dir.exists(), what="its directory removed")


def test_a_download_killed_in_the_middle_resumes(dev):
    make_repo(dev.hub_root, "cxygpt-test/resume", weights_bytes=40 * MIB, shard_bytes=20 * MIB)  # 5 s at 8 MiB/s
    httpx.post(dev.hub + "/_dev/stats/reset")
    dev.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(cached_md("resume", "cxygpt-test/resume")))
    claim = wait_until(lambda: dev.status("resume").get("cache", {}).get("claimName"), what="the claim")
    wait_until(lambda: json.loads(dev.kubectl("get", "pvc", claim, "-o", "json").stdout)["status"].get("phase")
               == "Bound", what="the claim bound")
    partial = dev.claim_dir(claim) / "cxygpt-test/resume/.cxygpt-partial"
    wait_until(lambda: sum(p.stat().st_size for p in partial.glob("*.safetensors")) >= 8 * MIB, timeout=60,
               interval=0.1, what="8 MiB downloaded")
    status = dev.status("resume")
    assert status["cache"]["phase"] == "Downloading" and status["phase"] == "Pending"
    loader = pids("cxygpt-cache-load --repo cxygpt-test/resume")
    assert len(loader) == 1
    os.kill(loader[0], signal.SIGKILL)

    status = wait_until(lambda: (s := dev.status("resume")).get("phase") == "Ready" and s, timeout=90, interval=0.2,
                        what="resume Ready")
    job = json.loads(dev.kubectl("get", "job", claim, "-o", "json").stdout)
    assert job["status"]["failed"] == 1 and job["status"]["succeeded"] == 1  # the second attempt finished it
    stats = dev.stats()
    weights = sum(v for k, v in stats["files"].items() if k.endswith(".safetensors"))
    assert stats["range_requests"] >= 1 and 40 * MIB <= weights <= 43 * MIB, stats
    assert status["cache"]["bytesTotal"] > 40 * MIB
    dev.kubectl("delete", "md", "resume", "--timeout=30s")
