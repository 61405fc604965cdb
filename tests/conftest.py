"""Shared fixtures: the real cluster (one per test process), and the in-memory Kubernetes API with the project's CRDs."""
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from kubernetes import client, config

from cxygpt_dev import network
from cxygpt_dev.cluster import Cluster
from cxygpt_dev.kubeapi import write_kubeconfig
from harness import REPO, ServerProcess, free_port
from kube import Kubectl, new_namespace


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


_network_error: Exception | None = None


def pytest_configure(config):
    """Each test process (an xdist worker, or pytest alone; not xdist's controller, whose workers each need their own)
    runs in a private network namespace of its own, the dev cluster's: pods have addresses there, and two workers'
    clusters never meet. Done first, before any thread or server starts."""
    global _network_error
    if config.getoption("numprocesses", default=None) and not hasattr(config, "workerinput"):
        return
    try:
        network.enter_private_network()
    except network.NetworkError as e:
        _network_error = e


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """A real cluster (control plane, kubelets of kind-config.yaml's three GPU nodes, storage and Services), one per
    test process: it starts in ~10 s, and each test keeps to namespaces of its own."""
    if _network_error:
        raise _network_error
    running = Cluster(root=tmp_path_factory.mktemp("cluster")).start()
    yield running
    running.stop()


@pytest.fixture(scope="session")
def control_plane(cluster):
    return cluster.plane


@pytest.fixture
def kube(cluster, tmp_path):
    """kubectl as the cluster's admin in a namespace of this test's own (deleted afterwards, with what is in it)."""
    admin = Kubectl(cluster.kubeconfig, cache=tmp_path / "kubectl-cache")
    namespace = new_namespace(admin)
    yield Kubectl(cluster.kubeconfig, namespace, cache=tmp_path / "kubectl-cache")
    admin("delete", "namespace", namespace, "--wait=false")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test on the real cluster shows the last lines of each of its components."""
    outcome = yield
    report = outcome.get_result()
    running = item.funcargs.get("cluster") if hasattr(item, "funcargs") else None
    if report.failed and isinstance(running, Cluster):
        report.sections.append(("cluster components", running.logs()))
