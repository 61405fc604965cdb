"""The chart's RBAC allows every call the real operator and gateway make: they run behind a proxy that enforces it."""
from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone

import aiohttp
import httpx
import pytest
import yaml
from aiohttp import web

from cxygpt_dev.kubeapi import write_kubeconfig
from harness import free_port, wait_until
from test_helm_install import CHART, Install

CI = CHART / "ci"
RELEASE, NAMESPACE = "cxygpt", "cxygpt"
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "upgrade", "te", "trailer"}
# Kubernetes' bootstrap ClusterRoles system:discovery and system:public-info-viewer, bound to every
# authenticated user: the non-resource URLs nobody needs a chart's rule for
PUBLIC_NON_RESOURCE = ("/api", "/api/*", "/apis", "/apis/*", "/healthz", "/livez", "/readyz", "/version", "/version/",
                       "/openapi", "/openapi/*")


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    query: tuple          # (key, value) pairs
    status: int           # the API server's answer (0: refused here)
    owners: tuple         # (apiVersion, kind) of ownerReferences with blockOwnerDeletion in the request body


class RecordingProxy:
    """An HTTP proxy to the API server that records every request and, as the API server's RBAC authorizer
    would, answers 403 to what `authorize` refuses; the rest it forwards (watches streamed)."""

    def __init__(self, upstream: str, authorize):
        self.upstream, self.port, self.calls, self.denied = upstream.rstrip("/"), free_port(), [], []
        self.authorize = authorize
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "RecordingProxy":
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=10)
        return self

    async def _start(self):
        self.session = aiohttp.ClientSession(auto_decompress=False, timeout=aiohttp.ClientTimeout(total=None))
        app = web.Application(client_max_size=64 << 20)
        app.router.add_route("*", "/{tail:.*}", self.forward)
        self.runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def forward(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        call = Call(request.method, request.path, tuple(request.query.items()), 0, blocking_owners(body))
        refused = [a for a in attributes(call) if not self.authorize(a)]
        if refused:
            self.calls.append(call)
            self.denied += refused
            return web.json_response({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden",
                                      "code": 403, "message": f"forbidden: {refused[0]} (the chart's RBAC)"},
                                     status=403)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        async with self.session.request(request.method, self.upstream + request.path_qs, data=body,
                                        headers=headers) as upstream:
            call = replace(call, status=upstream.status)
            self.calls.append(call)
            # a check only the answer tells (an apply that created the object): too late to refuse, still counted
            self.denied += [a for a in attributes(call) if not self.authorize(a)]
            response = web.StreamResponse(status=upstream.status, headers={
                k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP})
            await response.prepare(request)
            try:
                async for chunk in upstream.content.iter_any():  # a watch: each event as it comes
                    await response.write(chunk)
                await response.write_eof()
            except (ConnectionError, aiohttp.ClientError):
                pass  # the client went away (a process stopped) or the API server did
            return response

    def stop(self):
        async def _stop():
            await self.runner.cleanup()
            await self.session.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:  # streams whose client left but whose watch the API server still holds open
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        asyncio.run_coroutine_threadsafe(_stop(), self.loop).result(timeout=15)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        self.loop.close()


def blocking_owners(body: bytes) -> tuple:
    """Owners a write names with blockOwnerDeletion: the OwnerReferencesPermissionEnforcement admission plugin
    makes the writer prove `update` on each owner's finalizers subresource."""
    try:
        obj = yaml.safe_load(body) if body else None  # JSON is YAML; apply patches may be either
    except yaml.YAMLError:
        return ()
    if not isinstance(obj, dict):
        return ()
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return tuple(sorted({(r["apiVersion"], r["kind"]) for r in refs if r.get("blockOwnerDeletion")}))


@dataclass(frozen=True)
class Attributes:
    """What the API server's RBAC authorizer decides on (k8s.io/apiserver's RequestInfo)."""
    verb: str
    group: str = ""
    resource: str = ""        # "resource" or "resource/subresource"; empty for a non-resource URL
    namespace: str = ""
    name: str = ""
    path: str = ""            # the non-resource URL

    def __str__(self):
        if not self.resource:
            return f"{self.verb} {self.path}"
        where = f" in {self.namespace}" if self.namespace else " cluster-wide"
        return f"{self.verb} {self.group or 'core'}/{self.resource}{f' {self.name}' if self.name else ''}{where}"


VERBS = {"GET": "get", "HEAD": "get", "POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}
NAMESPACE_SUBRESOURCES = {"status", "finalize"}


def attributes(call: Call) -> list[Attributes]:
    """The authorization checks one request needs, parsed as the API server's request-info resolver does."""
    verb, query = VERBS[call.method], dict(call.query)
    parts = [p for p in call.path.split("/") if p]
    if parts[:1] == ["api"] and len(parts) >= 3:
        group, rest = "", parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 4:
        group, rest = parts[1], parts[3:]
    else:  # /api, /apis, /apis/<group>/<version> (discovery), /version, /healthz, ...
        return [Attributes(verb, path=call.path)]
    if rest[0] == "watch":  # the deprecated /watch/ path prefix
        verb, rest = "watch", rest[1:]
    namespace = ""
    if rest[0] == "namespaces" and len(rest) > 1:
        namespace = rest[1]
        if len(rest) > 2 and rest[2] not in NAMESPACE_SUBRESOURCES:
            rest = rest[2:]
    resource = rest[0]
    name = rest[1] if len(rest) > 1 else ""
    subresource = rest[2] if len(rest) > 2 else ""
    if not name and verb == "get":
        verb = "watch" if query.get("watch") in ("true", "1") else "list"
        selector = dict(s.split("=", 1) for s in query.get("fieldSelector", "").split(",") if "=" in s)
        name = selector.get("metadata.name", "")
    if not name and verb == "delete":
        verb = "deletecollection"
    checks = [Attributes(verb, group, f"{resource}/{subresource}" if subresource else resource, namespace, name)]
    if call.method == "PATCH" and call.status == 201:  # server-side apply that created the object
        checks.append(Attributes("create", group, resource, namespace, name))
    for api_version, kind in call.owners:  # plural by the kinds used here (ModelDeployment, Deployment)
        owner_group = api_version.rpartition("/")[0]
        checks.append(Attributes("update", owner_group, f"{kind.lower()}s/finalizers", namespace))
    return checks


def rule_allows(rule: dict, a: Attributes) -> bool:
    if not ({a.verb, "*"} & set(rule["verbs"])):
        return False
    if not a.resource:
        return any(u == a.path or (u.endswith("*") and a.path.startswith(u[:-1])) for u in rule.get("nonResourceURLs", []))
    resource, _, subresource = a.resource.partition("/")
    resources = set(rule.get("resources", []))
    return ({a.group, "*"} & set(rule.get("apiGroups", []))
            and bool({a.resource, "*"} & resources or (subresource and f"*/{subresource}" in resources))
            and (not rule.get("resourceNames") or a.name in rule["resourceNames"]))


def rules_for(docs: list[dict], service_account: str) -> list[tuple[str | None, dict]]:
    """(namespace the rule applies in, or None for everywhere; rule) for every rule bound to the account."""
    roles = {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]): d for d in docs
             if d["kind"] in ("Role", "ClusterRole")}
    found = []
    for binding in (d for d in docs if d["kind"] in ("RoleBinding", "ClusterRoleBinding")):
        if {"kind": "ServiceAccount", "name": service_account, "namespace": NAMESPACE} not in binding["subjects"]:
            continue
        scope = binding["metadata"].get("namespace") if binding["kind"] == "RoleBinding" else None
        ref = binding["roleRef"]
        role = roles[ref["kind"], scope if ref["kind"] == "Role" else None, ref["name"]]
        found += [(scope, rule) for rule in role["rules"]]
    return found


def allowed(rules: list[tuple[str | None, dict]], a: Attributes) -> bool:
    if not a.resource and any(p == a.path or (p.endswith("*") and a.path.startswith(p[:-1])) for p in PUBLIC_NON_RESOURCE):
        return a.verb == "get"
    return any((scope is None or scope == a.namespace) and rule_allows(rule, a) for scope, rule in rules)


def test_the_authorizer_model_can_say_no():
    """The parser and matcher above, on requests whose answer Kubernetes documents."""
    rules = [(None, {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get", "list"]}),
             ("llm", {"apiGroups": [""], "resources": ["services"], "verbs": ["patch"]}),
             (None, {"apiGroups": ["kopf.dev"], "resources": ["kopfpeerings"], "resourceNames": ["p"], "verbs": ["patch"]})]

    def check(method, path, query=(), status=200, owners=()):
        return [(str(a), allowed(rules, a)) for a in attributes(Call(method, path, query, status, owners))]

    assert check("GET", "/apis/apps/v1/deployments") == [("list apps/deployments cluster-wide", True)]
    assert check("GET", "/apis/apps/v1/namespaces/a/deployments", (("watch", "true"),)) == \
        [("watch apps/deployments in a", False)]
    assert check("GET", "/apis/apps/v1/namespaces/a/deployments/x/status") == [("get apps/deployments/status x in a", False)]
    assert check("PATCH", "/api/v1/namespaces/llm/services/s") == [("patch core/services s in llm", True)]
    assert check("PATCH", "/api/v1/namespaces/other/services/s") == [("patch core/services s in other", False)]
    assert check("PATCH", "/api/v1/namespaces/llm/services/s", status=201) == [
        ("patch core/services s in llm", True), ("create core/services s in llm", False)]
    assert check("PATCH", "/api/v1/namespaces/llm/services/s", owners=(("cxygpt.io/v1alpha1", "ModelDeployment"),)) == [
        ("patch core/services s in llm", True), ("update cxygpt.io/modeldeployments/finalizers in llm", False)]
    assert check("DELETE", "/apis/apps/v1/namespaces/a/deployments") == [("deletecollection apps/deployments in a", False)]
    assert check("PATCH", "/apis/kopf.dev/v1/namespaces/a/kopfpeerings/p") == [("patch kopf.dev/kopfpeerings p in a", True)]
    assert check("PATCH", "/apis/kopf.dev/v1/namespaces/a/kopfpeerings/q") == [("patch kopf.dev/kopfpeerings q in a", False)]
    assert check("GET", "/api/v1/namespaces/llm") == [("get core/namespaces llm in llm", False)]
    assert check("GET", "/apis/cxygpt.io/v1alpha1") == [("get /apis/cxygpt.io/v1alpha1", True)]
    assert check("POST", "/apis") == [("create /apis", False)]
    assert check("GET", "/metrics") == [("get /metrics", False)]


def watched_namespaces(docs: list[dict]) -> list[str]:
    op = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == f"{RELEASE}-operator")
    return [a.split("=", 1)[1] for a in op["spec"]["template"]["spec"]["containers"][0]["args"]
            if a.startswith("--namespace=")]


def served_models(gateway) -> set[str]:
    return {m["id"] for m in httpx.get(gateway.url + "/v1/models", timeout=5).json()["data"]}


@pytest.mark.parametrize("scenario", ["defaults", "ha", "watch-namespaces-ha"])
def test_the_chart_rbac_allows_every_call_the_operator_and_gateway_make(scenario, kube_api, tmp_path):
    values = CI / f"{scenario}-values.yaml" if scenario != "defaults" else None
    install = Install(kube_api, tmp_path, NAMESPACE, values=values)
    docs = install.objects + install.hooks
    watched = watched_namespaces(docs)
    rules = {c: rules_for(docs, f"{RELEASE}-{c}") for c in ("operator", "gateway")}
    assert all(rules.values()), "no rules bound to a component's ServiceAccount"
    # each component reaches the API only through a proxy that enforces the chart's rules for its account
    proxies = {c: RecordingProxy(kube_api.url, lambda a, r=r: allowed(r, a)).start() for c, r in rules.items()}
    try:
        install.install(*watched)
        peering = [h for h in install.hooks if h["kind"] in ("KopfPeering", "ClusterKopfPeering")]
        if peering:  # the post-install hook
            install.apply(peering)
        kubeconfigs = {c: write_kubeconfig(tmp_path / f"{c}.kubeconfig", p.url) for c, p in proxies.items()}
        install.start_operator(kubeconfig=kubeconfigs["operator"], autoscale_interval=0.5)
        gateway = install.start_gateway(kubeconfig=kubeconfigs["gateway"])
        # the gateway Service's one replica, the process above, where the autoscaler reads demand
        install.apply([{"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
                        "metadata": {"name": f"{RELEASE}-gateway-local", "namespace": NAMESPACE,
                                     "labels": {"kubernetes.io/service-name": f"{RELEASE}-gateway"}},
                        "ports": [{"name": "http", "port": gateway.port}],
                        "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": True}}]}])

        # a model in every namespace the release serves, engines made ready; then a second one that asks
        # for a served name already taken (a name conflict), a second later (timestamps have 1 s granularity)
        namespaces = watched or ["default"]
        for n, namespace in enumerate(namespaces):
            install.add_model(namespace, served=f"qwen3-0.6b-{n}")
        for namespace in namespaces:
            install.wait_engine(namespace)
            install.engine_ready(namespace)
        first = install.get("md", "qwen3-small", namespaces[0])["metadata"]["creationTimestamp"]
        created = datetime.strptime(first, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()
        wait_until(lambda: time.time() >= created + 1.05, timeout=3, what="the next second")
        install.add_model(namespaces[-1], name="qwen3-other", served="qwen3-0.6b-0")
        # the gateway routes what it watches (every watched namespace, or the last with a gateway taking one)
        wait_until(lambda: served_models(gateway) & {f"qwen3-0.6b-{n}" for n in range(len(namespaces))}, timeout=20,
                   what="the gateway to serve a model")
        wait_until(lambda: install.get("md", "qwen3-other", namespaces[-1]).get("status"), timeout=15,
                   what="the conflicting model's status")
        # a model with engines renamed onto a served name loses it: its engine objects are deleted
        install.add_model(namespaces[-1], name="qwen3-renamed", served="qwen3-solo")
        install.wait_engine(namespaces[-1], name="qwen3-renamed")
        install.kubectl("patch", "md", "qwen3-renamed", "-n", namespaces[-1], "--type=merge",
                        "-p", json.dumps({"spec": {"model": {"name": "qwen3-0.6b-0"}}}))
        wait_until(lambda: install.engine_deployment(namespaces[-1], "qwen3-renamed") is None, timeout=15,
                   what="the renamed model's engines deleted")

        # a model with a cache: its claim and download Job, the storage checks, the download's progress (pods/log)
        cached_ns = namespaces[0]
        install.apply([{"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "provisioner": "example.com/x",
                        "metadata": {"name": "standard",
                                     "annotations": {"storageclass.kubernetes.io/is-default-class": "true"}}},
                       {"apiVersion": "cxygpt.io/v1alpha1", "kind": "ModelDeployment",
                        "metadata": {"name": "qwen3-cached", "namespace": cached_ns},
                        "spec": {"model": {"name": "qwen3-cached", "source": "hf://Qwen/Qwen3-0.6B",
                                           "cache": {"enabled": True}}, "engine": {"kind": "sim"}}}])
        claim = wait_until(lambda: (install.get("md", "qwen3-cached", cached_ns).get("status") or {}).get(
            "cache", {}).get("claimName"), timeout=15, what="the cache's claim")
        install.apply([{"apiVersion": "v1", "kind": "Pod", "metadata": {
            "name": f"{claim}-aaaaa", "namespace": cached_ns, "labels": {"cxygpt.io/cache": claim}},
            "spec": {"containers": [{"name": "download", "image": "x"}]},
            "status": {"phase": "Running", "containerStatuses": [{"name": "download", "ready": True, "image": "x",
                                                                  "imageID": "x", "restartCount": 0,
                                                                  "state": {"running": {}}}]}}])
        wait_until(lambda: any(a.resource == "pods/log" for c in proxies["operator"].calls for a in attributes(c)),
                   timeout=15, what="the download's log read")
        install.kubectl("patch", "job", claim, "-n", cached_ns, "--subresource=status", "--type=merge", "-p",
                        json.dumps({"status": {"succeeded": 1, "conditions": [
                            {"type": "Complete", "status": "True", "reason": "CompletionsReached"}]}}))
        install.wait_engine(cached_ns, name="qwen3-cached")
        # autoscaling: idle, the operator takes a model to zero (scale subresource); a request wakes it there (the
        # gateway's one write) and waits for an engine that never comes here: the client gives up
        install.add_model(namespaces[0], name="qwen3-idle", served="qwen3-idle",
                          autoscaling={"minReplicas": 0, "maxReplicas": 2, "scaleDownDelaySeconds": 0})
        wait_until(lambda: install.get("md", "qwen3-idle", namespaces[0])["spec"]["replicas"] == 0 and
                   (install.get("md", "qwen3-idle", namespaces[0]).get("status") or {}).get("phase") == "ScaledToZero",
                   timeout=30, what="the idle model at zero")
        wait_until(lambda: any(m["id"] == "qwen3-idle" and m["state"] == "scaled_to_zero" for m in
                               httpx.get(gateway.url + "/v1/models", timeout=5).json()["data"]), timeout=15,
                   what="the gateway to see it at zero")
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(gateway.url + "/v1/chat/completions", timeout=2,
                       json={"model": "qwen3-idle", "messages": [{"role": "user", "content": "wake up"}]})
        wait_until(lambda: install.get("md", "qwen3-idle", namespaces[0])["spec"]["replicas"] >= 1, timeout=10,
                   what="woken")

        # deletion: the operator's finalizer comes off
        for namespace in namespaces:
            install.kubectl("delete", "md", "--all", "-n", namespace, "--wait=false")
        for namespace in namespaces:
            wait_until(lambda: not json.loads(install.kubectl("get", "md", "-n", namespace, "-o", "json"))["items"],
                       timeout=15, what=f"the models in {namespace} gone")
    except AssertionError as e:  # the work did not get done: say what the chart's RBAC refused meanwhile
        refused = {c: sorted({str(a) for a in p.denied}) for c, p in proxies.items()}
        raise AssertionError(f"refused by the chart's RBAC: {json.dumps(refused, indent=1)}\n{e}") from None
    finally:
        install.stop()  # shutting down is part of the work (kopf leaves the peering object then)
        for proxy in proxies.values():
            proxy.stop()

    denied = {c: sorted({str(a) for a in p.denied}) for c, p in proxies.items()}
    assert denied == {"operator": [], "gateway": []}, "the chart's RBAC forbids calls the components make:\n" + \
        json.dumps(denied, indent=1)
    calls = {c: [a for call in p.calls for a in attributes(call)] for c, p in proxies.items()}
    # the recording saw the work itself (a proxy that records nothing would pass everything)
    for component, needed in {"operator": [("patch", "apps", "deployments"), ("patch", "", "services"),
                                           ("create", "", "persistentvolumeclaims"), ("create", "batch", "jobs"),
                                           ("patch", "", "persistentvolumeclaims"), ("get", "", "pods/log"),
                                           ("list", "storage.k8s.io", "storageclasses"), ("list", "", "events"),
                                           ("watch", "cxygpt.io", "modeldeployments"),
                                           ("patch", "cxygpt.io", "modeldeployments/status"),
                                           ("patch", "cxygpt.io", "modeldeployments"),
                                           ("patch", "cxygpt.io", "modeldeployments/scale"),
                                           ("list", "discovery.k8s.io", "endpointslices"),
                                           ("watch", "autoscaling", "horizontalpodautoscalers")],
                              "gateway": [("list", "cxygpt.io", "modeldeployments"),
                                          ("watch", "cxygpt.io", "modeldeployments"),
                                          ("watch", "discovery.k8s.io", "endpointslices"),
                                          ("patch", "cxygpt.io", "modeldeployments/scale")]}.items():
        seen = {(a.verb, a.group, a.resource) for a in calls[component]}
        assert set(needed) <= seen, f"{component}: {sorted(set(needed) - seen)} not recorded; saw {sorted(seen)}"
    if watched:  # a namespaced release makes no namespaced call outside its namespaces (and its own, for the
        # gateway Service's endpoints)
        assert {a.namespace for c in calls.values() for a in c if a.namespace and a.resource != "endpointslices"} \
            <= set(watched)
        assert {a.namespace for a in calls["operator"] if a.resource == "endpointslices"} == {NAMESPACE}
    # the gateways count themselves from their Service's slices, in the release namespace
    assert ("watch", NAMESPACE) in {(a.verb, a.namespace) for a in calls["gateway"] if a.resource == "endpointslices"}

