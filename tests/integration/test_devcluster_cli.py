"""`cxygpt-dev` as a newcomer meets it: the README's quickstart commands run as printed; a taken port fails at once."""
import json
import re
import socket
import subprocess
import time

import pytest

from harness import REPO, console_script, free_port

pytestmark = pytest.mark.timeout(300)


def readme_blocks(heading: str) -> list[str]:
    """The shell blocks of one section of the README (up to the next heading of any level)."""
    readme = (REPO / "README.md").read_text()
    section = readme.split(f"\n{heading}\n", 1)[1].split("\n#", 1)[0]
    return re.findall(r"```sh\n(.*?)```", section, re.S)


def quickstart_commands() -> list[str]:
    """The shell blocks of the README's "Two commands" section, after the one that shows `make demo`."""
    blocks = readme_blocks("## Two commands")
    assert "make demo" in blocks[0]
    return blocks[1:]


def test_a_taken_gateway_port_fails_at_once(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        began = time.monotonic()
        for extra in ([], ["--detach"]):
            out = subprocess.run([console_script("cxygpt-dev"), "up", *extra, "--no-examples", "--state-dir",
                                  str(tmp_path / "state"), "--gateway-port", str(port)],
                                 capture_output=True, text=True, timeout=30, cwd=tmp_path)
            assert out.returncode == 1, out.stdout + out.stderr
            assert f"127.0.0.1:{port} (the gateway's port) is in use" in out.stderr and "up" not in out.stdout
        assert time.monotonic() - began < 15


def test_readme_quickstart_runs_as_printed(tmp_path):
    """`make demo`'s cluster (examples applied), then every quickstart command from the clone's directory."""
    port = free_port()
    (tmp_path / ".venv").symlink_to(REPO / ".venv")  # a clone's venv, as `make demo` leaves it
    up = subprocess.run([console_script("cxygpt-dev"), "up", "--detach", "--state-dir", str(tmp_path / ".cxygpt-dev"),
                         "--gateway-port", str(port)], capture_output=True, text=True, timeout=240, cwd=tmp_path)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        log = (tmp_path / ".cxygpt-dev" / "cxygpt-dev.log").read_text()
        printed = [line.strip() for line in log.splitlines() if line.startswith("  ") and "kubectl" in line]
        assert printed and all("--validate=false" not in line for line in printed)
        assert "first streamed chat via the gateway" in log
        for block in quickstart_commands():
            script = block.replace("127.0.0.1:8001", f"127.0.0.1:{port}")
            out = subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True,
                                 timeout=120, cwd=tmp_path)
            assert out.returncode == 0, f"{block}\n{out.stdout}\n{out.stderr}"
            assert "Error" not in out.stderr, out.stderr
        # what the blocks did shows: the scale went through, and each printed command ran
        kubectl = [".venv/bin/kubectl", "--kubeconfig", ".cxygpt-dev/kubeconfig"]
        md = json.loads(subprocess.run([*kubectl, "get", "md", "qwen3-small", "-o", "json"], capture_output=True,
                                       text=True, timeout=60, cwd=tmp_path).stdout)
        assert md["spec"]["replicas"] == 3
        for line in printed:
            if " get " in line or " apply " in line:
                out = subprocess.run(["bash", "-c", line], capture_output=True, text=True, timeout=60, cwd=tmp_path)
                assert out.returncode == 0, f"{line}\n{out.stderr}"
    finally:
        subprocess.run([console_script("cxygpt-dev"), "down", "--state-dir", str(tmp_path / ".cxygpt-dev")],
                       capture_output=True, timeout=60)


def test_a_port_held_only_by_a_stopped_runs_closed_connections_is_free():
    """Right after a stop, the gateway's port may be held by TIME-WAIT sockets only: `cxygpt-dev up` takes it."""
    from cxygpt_dev.main import port_taken
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    served, _ = listener.accept()
    assert port_taken(port)  # a server listens
    served.close()  # the server closes first: its side of the connection waits in TIME-WAIT
    client.close()
    listener.close()
    states = subprocess.run(["ss", "-tanH", "state", "time-wait", f"( sport = :{port} )"], capture_output=True,
                            text=True).stdout
    assert states.strip(), "no TIME-WAIT socket: the test would prove nothing"
    assert not port_taken(port)


def test_readme_real_control_plane_commands_run_as_printed(tmp_path):
    """The README's commands for the dev cluster on real Kubernetes, from a clone's directory (`make kube` and
    `make bootstrap-test` have run: `make test` runs them first): the whole demo on the pinned release."""
    [block] = readme_blocks("### The dev cluster on real Kubernetes")
    lines = [line for line in block.splitlines() if line.strip() and not line.startswith("make ")]
    assert lines[0].endswith("cxygpt-dev up --control-plane real --detach") and lines[-1].endswith("cxygpt-dev down")
    (tmp_path / ".venv").symlink_to(REPO / ".venv")
    port = free_port()
    script = "\n".join(lines).replace("--detach", f"--detach --gateway-port {port}")
    try:
        out = subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True, timeout=280,
                             cwd=tmp_path)
        assert out.returncode == 0, f"{out.stdout}\n{out.stderr}"
        pinned = re.search(r"^\s*k8s.io/kubernetes (v\S+)", (REPO / "devcluster/kube/go.mod").read_text(), re.M)[1]
        assert f"Server Version: {pinned}" in out.stdout and "on the real control plane" in out.stdout
        assert len(re.findall(r"^cxygpt-worker\d?\s+Ready\s", out.stdout, re.M)) == 3, out.stdout
        assert re.search(r"qwen3-small\s+qwen3-0.6b\s+SRV_80G\s+1x79GiB\s+2/2\s+Ready", out.stdout), out.stdout
        assert out.stdout.rstrip().endswith("cxygpt-dev: stopped")
    finally:
        subprocess.run([console_script("cxygpt-dev"), "down", "--state-dir", str(tmp_path / ".cxygpt-dev")],
                       capture_output=True, timeout=120)
