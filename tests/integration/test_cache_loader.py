"""The download Job's program (cxygpt-cache-load) and the simulator's own download: the real huggingface_hub
against the dev cluster's local Hub (a real HTTP server): pinned, resumed after a kill, verified, failures named."""
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from cxygpt_dev.hub import make_repo
from harness import ServerProcess, console_script, free_port, wait_until

MIB = 2**20


@pytest.fixture
def hub(tmp_path):
    root = tmp_path / "hub"
    make_repo(root, "test/tiny", weights_bytes=3 * MIB)
    make_repo(root, "test/big", weights_bytes=24 * MIB, shard_bytes=12 * MIB)
    make_repo(root, "test/gated", weights_bytes=MIB, token="hf_secret")
    port = free_port()
    proc = ServerProcess([sys.executable, "-m", "cxygpt_dev.hub", "--root", str(root), "--port", str(port),
                          "--rate-mib-s", "6"], port=port, log_path=tmp_path / "hub.log").start()
    yield proc
    proc.stop()


def env(hub, tmp_path, **extra):
    return {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_TELEMETRY": "1", **extra}


def load(hub, tmp_path, repo, *extra, **env_extra) -> tuple[int, list[dict], dict]:
    claim, term = tmp_path / "claim", tmp_path / "termination-log"
    out = subprocess.run([console_script("cxygpt-cache-load"), "--repo", repo, "--dir", str(claim),
                          "--termination-log", str(term), *extra], capture_output=True, text=True, timeout=60,
                         env=env(hub, tmp_path, **env_extra))
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return out.returncode, lines, json.loads(term.read_text()) if term.exists() and term.read_text() else {}


def stats(hub) -> dict:
    return httpx.get(hub.url + "/_dev/stats").json()


def test_a_download_is_pinned_verified_and_recorded(hub, tmp_path):
    code, lines, result = load(hub, tmp_path, "test/tiny")
    assert code == 0, lines
    sha = lines[0]["revision"]
    assert len(sha) == 40 and lines[0]["requestedRevision"] == "main"
    assert result == {"revision": sha, "bytes": lines[0]["bytesTotal"], "files": 5}
    assert [line for line in lines if line["event"] == "progress"][-1]["bytesDone"] == result["bytes"]
    files = sorted(p.name for p in (tmp_path / "claim/test/tiny").iterdir() if p.is_file())
    assert files == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json"]
    manifest = json.loads((tmp_path / "claim/.cxygpt-cache.json").read_text())
    assert manifest["revision"] == sha and manifest["files"]["model.safetensors"]["sha256"]
    # the weights came as the Hub serves LFS files: a redirect to another origin, a signed URL there
    assert stats(hub)["files"]["model.safetensors"] == 3 * MIB

    # a second run downloads nothing
    before = stats(hub)["bytes"]
    assert load(hub, tmp_path, "test/tiny")[0] == 0 and stats(hub)["bytes"] == before
    weights = tmp_path / "claim/test/tiny/model.safetensors"
    meta = tmp_path / "claim/test/tiny/.cache/huggingface/download/model.safetensors.metadata"
    written_at = float(meta.read_text().splitlines()[2])

    def corrupt(mtime: float) -> None:
        with open(weights, "r+b") as f:
            f.seek(1000)
            f.write(b"X")
        os.utime(weights, (mtime, mtime))

    # huggingface_hub trusts a file changed within 1 s of its record (mtime is imprecise, it says): our own
    # check finds it, removes it, and the next attempt downloads it again
    corrupt(written_at)
    code, lines, result = load(hub, tmp_path, "test/tiny")
    assert code == 1 and result["reason"] == "VerificationFailed" and "model.safetensors" in result["message"]
    assert not weights.exists()
    assert load(hub, tmp_path, "test/tiny")[0] == 0 and weights.stat().st_size == 3 * MIB
    # a file changed later than that huggingface_hub hashes again, and downloads in the same attempt
    written_at = float(meta.read_text().splitlines()[2])
    before = stats(hub)["files"]["model.safetensors"]
    corrupt(written_at + 5)
    assert load(hub, tmp_path, "test/tiny")[0] == 0
    assert stats(hub)["files"]["model.safetensors"] == before + 3 * MIB
    assert (tmp_path / "claim/.cxygpt-cache.json").exists()


def test_a_killed_download_resumes_where_it_stopped(hub, tmp_path):
    httpx.post(hub.url + "/_dev/stats/reset")
    claim = tmp_path / "claim"
    proc = subprocess.Popen([console_script("cxygpt-cache-load"), "--repo", "test/big", "--dir", str(claim)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env(hub, tmp_path),
                            start_new_session=True)
    partial = claim / "test/big/.cxygpt-partial"
    wait_until(lambda: sum(p.stat().st_size for p in partial.glob("*.safetensors")) >= 4 * MIB, timeout=30,
               interval=0.1, what="a few MiB of the weights on disk")
    os.killpg(proc.pid, signal.SIGKILL)  # as the node or an OOM kill would
    proc.wait(timeout=10)
    kept = sum(p.stat().st_size for p in partial.glob("*.safetensors"))
    assert 0 < kept < 24 * MIB
    code, lines, result = load(hub, tmp_path, "test/big")
    assert code == 0, lines
    served = stats(hub)
    assert served["range_requests"] >= 1  # resumed with Range requests, not from zero
    weights = sum(v for k, v in served["files"].items() if k.endswith(".safetensors"))
    # all of it once, plus at most one chunk per file that was in flight when the attempt died
    assert 24 * MIB <= weights <= 24 * MIB + 3 * MIB, served
    assert not partial.exists()


def test_failures_say_why_and_which_can_be_retried(hub, tmp_path):
    code, lines, result = load(hub, tmp_path, "test/missing")
    assert code == 2 and result["reason"] == "RepositoryNotFound"  # 2: the Job's podFailurePolicy fails it at once
    code, _, result = load(hub, tmp_path, "test/tiny", "--revision", "v9")
    assert code == 2 and result == {"reason": "RevisionNotFound", "message": "test/tiny has no revision 'v9'"}
    code, _, result = load(hub, tmp_path, "test/gated")
    assert code == 2 and result["reason"] == "GatedRepo" and "tokenSecretRef" in result["message"]
    code, _, result = load(hub, tmp_path, "test/gated", HF_TOKEN="hf_secret")
    assert code == 0 and result["files"] == 5
    hub.stop()
    code, _, result = load(hub, tmp_path, "test/tiny", "--revision", "main")
    assert code == 1 and result["reason"] == "HubUnreachable"  # a retry may help


def test_the_simulator_downloads_a_hub_model_before_it_listens_and_reads_a_local_one(hub, tmp_path):
    def serve(model, **env_extra):
        port = free_port()
        began = time.monotonic()
        with ServerProcess([console_script("cxygpt-sim"), "serve", model, "--port", str(port), "--host", "127.0.0.1",
                            "--sim-load-gib-per-s", "0.05"], port=port, log_path=tmp_path / f"sim-{port}.log",
                           env=env(hub, tmp_path, **env_extra), ready_timeout=60) as sim:
            took = time.monotonic() - began
            return took, sim.log()

    httpx.post(hub.url + "/_dev/stats/reset")
    took, log = serve("test/big")  # 24 MiB at the hub's 6 MiB/s, then read at 0.05 GiB/s
    assert "from hub" in log and stats(hub)["bytes"] >= 24 * MIB and took > 4
    local = next((tmp_path / "hf-home").rglob("model-00001-of-00002.safetensors")).parent
    took_local, log = serve(str(local), HF_HUB_OFFLINE="1")
    assert "from local" in log and took_local < took
    # offline, a model not downloaded before cannot start (as vLLM)
    port = free_port()
    out = subprocess.run([console_script("cxygpt-sim"), "serve", "test/tiny", "--port", str(port)],
                         capture_output=True, text=True, timeout=60, env=env(hub, tmp_path, HF_HUB_OFFLINE="1"))
    assert out.returncode != 0 and "cannot get the weights of test/tiny" in out.stderr
