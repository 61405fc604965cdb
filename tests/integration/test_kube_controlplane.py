"""The real control plane the tests run on: the pinned release, RBAC enforced for every identity but the admin."""
import json
import re
import subprocess

from cxygpt_dev.certs import write_kubeconfig
from harness import REPO, console_script, wait_until


def kubectl(kubeconfig, *args, check=True) -> subprocess.CompletedProcess:
    out = subprocess.run([console_script("kubectl"), "--kubeconfig", str(kubeconfig), *args], capture_output=True,
                         text=True, timeout=60)
    assert not check or out.returncode == 0, f"kubectl {args}: {out.stderr}"
    return out


def test_the_server_is_the_pinned_release(control_plane):
    pinned = re.search(r"^\s*k8s.io/kubernetes (v\S+)", (REPO / "devcluster/kube/go.mod").read_text(), re.M)[1]
    version = json.loads(kubectl(control_plane.kubeconfig, "version", "-o", "json").stdout)
    assert version["serverVersion"]["gitVersion"] == pinned
    # the controllers run, each under its own service account (--use-service-account-credentials)
    wait_until(lambda: {"serviceaccount/deployment-controller", "serviceaccount/endpointslice-controller"} <= set(
        kubectl(control_plane.kubeconfig, "get", "serviceaccounts", "-n", "kube-system", "-o", "name").stdout.split()),
        timeout=30, what="the controllers' service accounts")


def test_an_identity_without_roles_is_refused_and_a_role_binding_lets_it(control_plane, tmp_path):
    user = control_plane.issue("nobody", "nobody", client=True)
    kubeconfig = write_kubeconfig(tmp_path / "nobody", control_plane.url, control_plane.ca.pair.cert, user="nobody",
                                  client=user)
    refused = kubectl(kubeconfig, "get", "configmaps", "-n", "default", check=False)
    assert refused.returncode != 0 and 'User "nobody" cannot list resource "configmaps"' in refused.stderr
    admin = control_plane.kubeconfig
    kubectl(admin, "create", "role", "reader", "-n", "default", "--verb=list", "--resource=configmaps")
    kubectl(admin, "create", "rolebinding", "reader", "-n", "default", "--role=reader", "--user=nobody")
    try:
        kubectl(kubeconfig, "get", "configmaps", "-n", "default")
        assert kubectl(kubeconfig, "get", "secrets", "-n", "default", check=False).returncode != 0
    finally:
        kubectl(admin, "delete", "rolebinding,role", "reader", "-n", "default")
