"""The README's Helm section stays true: its values render, its names are the chart's and kind's."""
from __future__ import annotations

import re

import pytest
import yaml
from test_helm_chart import CHART, RELEASE, find, helm, one, render

from harness import REPO

README = (REPO / "README.md").read_text()
SECTION = README.split("\n## Helm\n", 1)[1]


def test_helm_is_the_last_section():
    assert "\n## " not in SECTION


def table_rows():
    for line in SECTION.splitlines():
        if line.startswith("| `"):
            yield re.findall(r"`([\w.]+=[^`]*)`", line.split("|")[1])


@pytest.mark.parametrize("sets", [s for s in table_rows() if s], ids=lambda s: s[0].split("=")[0])
def test_every_setting_in_the_table_renders(sets, tmp_path):
    args = [a for s in sets for a in ("--set", s.replace("=NAME", "=name").replace("=...", "=example/image:1"))]
    if any(s.startswith("gateway.apiKeys.enabled") for s in sets) and not any("existingSecret" in s for s in sets):
        pytest.fail(f"{sets}: needs keys to render")
    helm("template", RELEASE, str(CHART), *args)


def test_commands_use_the_chart_and_kind_names():
    kind = yaml.safe_load((REPO / "kind-config.yaml").read_text())
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    load = re.search(r"for image in ([\w ]+); do kind load docker-image (\S+)\$image:(\S+) --name (\S+); done", SECTION)
    assert load, "kind load loop"
    images = {f"{load.group(2)}{name}:{load.group(3)}" for name in load.group(1).split()}
    assert images == {f"{values['operator']['image']['repository']}:{chart['appVersion']}",
                      f"{values['gateway']['image']['repository']}:{chart['appVersion']}",
                      f"{values['operator']['simImage']['repository']}:{chart['appVersion']}",
                      f"{values['console']['image']['repository']}:{chart['appVersion']}"}
    assert load.group(4) == kind["name"]
    assert len([n for n in kind["nodes"] if n["role"] == "worker" and "nvidia.com/gpu.memory" in n.get("labels", {})]) == 3
    for path in re.findall(r"kubectl apply -f ([^\s`]+)", SECTION) + ["kind-config.yaml", "deploy/helm/cxygpt/ci"]:
        assert (REPO / path).exists(), path
    assert f"helm install {RELEASE} deploy/helm/cxygpt" in SECTION
    docs = render()
    assert f"service/{one(docs, 'Service', f'{RELEASE}-gateway')['metadata']['name']} 8080:80" in SECTION


def test_uninstall_names_what_the_chart_leaves_behind(tmp_path):
    docs = render("ha")
    peering = one(docs, "ClusterKopfPeering")["metadata"]["name"]
    assert f"kubectl delete clusterkopfpeering\n{peering}" in SECTION or f"clusterkopfpeering {peering}" in SECTION
    crds = {c["metadata"]["name"] for c in find(docs, "CustomResourceDefinition")}
    for name in re.findall(r"kubectl delete crd ([\w. ]+)", SECTION):
        assert set(name.split()) <= crds
    openwebui = one(render("openwebui"), "Service", f"{RELEASE}-openwebui")
    assert f"service/{openwebui['metadata']['name']} 3000:80" in SECTION
    console = one(render("console"), "Service", f"{RELEASE}-console")
    assert f"service/{console['metadata']['name']} 8090:80" in SECTION
