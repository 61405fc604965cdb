"""Shared fixtures: a real in-memory Kubernetes API process with the project's CRDs, and its kubeconfig."""
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from kubernetes import client, config

from cxygpt_dev.kubeapi import write_kubeconfig
from harness import REPO, ServerProcess, free_port


@dataclass
class KubeApi:
    process: ServerProcess
    kubeconfig: Path

    @property
    def url(self) -> str:
        return self.process.url

    def api_client(self) -> client.ApiClient:
        return config.new_client_from_config(config_file=str(self.kubeconfig))


def start_kube_api(tmp: Path) -> KubeApi:
    port = free_port()
    proc = ServerProcess([sys.executable, "-m", "cxygpt_dev.kubeapi", "--port", str(port),
                          "--preload", str(REPO / "deploy" / "crds")],
                         port=port, log_path=tmp / "kubeapi.log", health="/version")
    proc.start()
    return KubeApi(proc, write_kubeconfig(tmp / "kubeconfig", proc.url))


@pytest.fixture
def kube_api(tmp_path):
    api = start_kube_api(tmp_path)
    yield api
    api.process.stop()


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory):
    """A real control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler), one per test process:
    it starts in seconds, and each test keeps to namespaces of its own."""
    from cxygpt_dev.controlplane import ControlPlane
    plane = ControlPlane(root=tmp_path_factory.mktemp("kube")).start()
    yield plane
    plane.stop()
