"""Kubernetes discovery's pure part: ready endpoints, name ownership across namespaces, and why a model has none."""
from __future__ import annotations

from cxygpt_gateway.discovery.base import ModelSpec, Unavailable
from cxygpt_gateway.discovery.kubernetes import (
    desired_routes,
    name_owners,
    ready_endpoint_count,
    ready_endpoint_urls,
    why_unavailable,
)
from cxygpt_profiles import default_table


def modeldeployment(name="qwen3-14b", phase="Ready", namespace="llm", *, served=None, created="2026-12-01T10:00:00Z",
                    uid="u1", replicas=1, **status):
    limits = default_table().get("DEV_32G").limits.model_dump(by_alias=True)
    return {"metadata": {"name": name, "namespace": namespace, "creationTimestamp": created, "uid": uid},
            "spec": {"model": {"name": served or name}, "fallbackModel": "small", "replicas": replicas},
            "status": {"phase": phase, "mode": "multi", "profile": "DEV_32G", "limits": limits,
                       "endpoint": f"http://{name}.{namespace}.svc:8000", **status}}


def endpointslice(service, namespace="llm", port=8000, endpoints=()):
    return {"metadata": {"name": f"{service}-x", "namespace": namespace,
                         "labels": {"kubernetes.io/service-name": service}},
            "ports": [{"port": port}], "endpoints": list(endpoints)}


def test_every_ready_endpoint_serves_and_not_ready_or_terminating_ones_drain():
    slices = [endpointslice("m", endpoints=[
        {"addresses": ["10.0.0.2"], "conditions": {"ready": True}},
        {"addresses": ["10.0.0.1"]},  # no conditions: ready, as the EndpointSlice API says
        {"addresses": ["10.0.0.3"], "conditions": {"ready": False}},
        {"addresses": ["10.0.0.4"], "conditions": {"ready": False, "serving": True, "terminating": True}},
        {"addresses": ["10.0.0.5"], "conditions": {"serving": True, "terminating": True}},
        {"addresses": ["fd00::1"], "conditions": {"ready": True}}])]
    assert ready_endpoint_urls(slices) == ["http://10.0.0.1:8000", "http://10.0.0.2:8000", "http://[fd00::1]:8000"]


def test_the_gateways_are_the_ready_pods_of_their_service_each_counted_once():
    pod = lambda name, *addresses, **conditions: {"addresses": list(addresses), "conditions": conditions,  # noqa: E731
                                                  "targetRef": {"kind": "Pod", "name": name, "uid": f"uid-{name}"}}
    ipv4 = endpointslice("gw", endpoints=[pod("a", "10.0.0.1", ready=True), pod("b", "10.0.0.2"),
                                          pod("c", "10.0.0.3", ready=False),
                                          pod("d", "10.0.0.4", ready=False, serving=True, terminating=True)])
    ipv6 = endpointslice("gw", endpoints=[pod("a", "fd00::1", ready=True), pod("b", "fd00::2", ready=True)])
    assert ready_endpoint_count([ipv4, ipv6]) == 2      # a dual-stack Service lists each pod in both slices
    assert ready_endpoint_count([endpointslice("gw", endpoints=[{"addresses": ["10.0.0.1"]},
                                                                {"addresses": ["10.0.0.2"]}])]) == 2  # no targetRef
    assert ready_endpoint_count([]) == ready_endpoint_count([endpointslice("gw")]) == 0


def test_a_model_routes_to_its_ready_endpoints_whatever_its_phase():
    one_ready = {("llm", "s"): endpointslice("qwen3-14b", endpoints=[
        {"addresses": ["10.0.0.1"], "conditions": {"ready": True}},
        {"addresses": ["10.0.0.2"], "conditions": {"ready": False}}])}
    for phase in ("PartiallyReady", "Ready", "Starting", "Failed"):  # e.g. a rollout: 1 of 2 serves
        mds = {("llm", "qwen3-14b"): modeldeployment(phase=phase)}
        spec = desired_routes(mds, one_ready)["qwen3-14b"]
        assert isinstance(spec, ModelSpec)
        assert (spec.urls, spec.fallback, spec.limits.max_output_tokens, spec.unavailable) == (
            ("http://10.0.0.1:8000",), "small", 256, None)


def test_the_service_address_is_never_a_route():
    spec = desired_routes({("llm", "m"): modeldeployment("m")}, {})["m"]
    assert spec.urls == () and "restarting" in spec.unavailable.message


def test_a_model_with_no_ready_replica_says_why():
    cases = {
        "Starting": ("is starting", 10), "PartiallyReady": ("is restarting", 5), "Ready": ("is restarting", 5),
        "Pending": ("waiting for a GPU node", 30), "Failed": ("cannot serve", 60), "ScaledToZero": ("scaled to zero", 30),
    }
    for phase, (words, retry) in cases.items():
        why = why_unavailable(modeldeployment(phase=phase, conditions=[
            {"type": "Degraded", "status": "True", "reason": "EngineCrashLoop", "message": "exit code 2: bad flag"}]))
        assert words in why.message and why.retry_after_s == retry, (phase, why)
    assert "exit code 2: bad flag" in why_unavailable(modeldeployment(phase="Failed", conditions=[
        {"type": "Degraded", "status": "True", "message": "exit code 2: bad flag"}])).message
    assert "scaled to zero" in why_unavailable(modeldeployment(phase="Ready", replicas=0)).message
    downloading = modeldeployment(phase="Pending")
    downloading["status"]["cache"] = {"phase": "Downloading", "message": "downloading Org/M@main: 1.00 GiB of 8.00 GiB"}
    assert why_unavailable(downloading).message == \
        "model qwen3-14b is waiting for its weights: downloading Org/M@main: 1.00 GiB of 8.00 GiB"
    assert "being set up" in why_unavailable({"spec": {"model": {"name": "m"}}}).message


def test_a_name_without_usable_limits_is_reserved_not_routed():
    unreconciled = {"metadata": {"name": "m", "namespace": "llm"}, "spec": {"model": {"name": "m"}}}
    broken = modeldeployment("b", limits={"maxInputTokens": "many"})
    routes = desired_routes({("llm", "m"): unreconciled, ("llm", "b"): broken}, {})
    assert isinstance(routes["m"], Unavailable) and isinstance(routes["b"], Unavailable)


def test_the_oldest_modeldeployment_owns_a_served_name_in_any_namespace():
    # the alphabetically first namespace used to win; age decides now, then uid
    newer = modeldeployment("chat", namespace="a-tenant", served="shared", created="2026-12-01T10:00:05Z", uid="z")
    older = modeldeployment("chat", namespace="b-tenant", served="shared", created="2026-12-01T10:00:00Z", uid="y")
    mds = {("a-tenant", "chat"): newer, ("b-tenant", "chat"): older}
    assert name_owners(mds) == {"shared": ("b-tenant", "chat")}
    slices = {("a-tenant", "s"): endpointslice("chat", namespace="a-tenant", port=1,
                                                 endpoints=[{"addresses": ["10.0.0.1"]}]),
              ("b-tenant", "s"): endpointslice("chat", namespace="b-tenant", port=2,
                                                 endpoints=[{"addresses": ["10.0.0.2"]}])}
    assert desired_routes(mds, slices)["shared"].urls == ("http://10.0.0.2:2",)  # the owner's engines only
    twin = modeldeployment("chat", namespace="c-tenant", served="shared", created="2026-12-01T10:00:00Z", uid="x")
    assert name_owners({**mds, ("c-tenant", "chat"): twin}) == {"shared": ("c-tenant", "chat")}  # same second: uid
    del mds["b-tenant", "chat"]
    assert name_owners(mds) == {"shared": ("a-tenant", "chat")}  # the owner gone: the next oldest


def test_an_older_model_renamed_onto_a_live_name_does_not_take_it_over():
    owner = modeldeployment("victim", namespace="default", served="victim", created="2026-12-01T10:00:05Z", uid="b",
                            nameClaim={"name": "victim", "since": "2026-12-01T10:00:05Z"})
    renamed = modeldeployment("twin", namespace="tenant2", served="victim", created="2026-12-01T09:00:00Z", uid="a",
                              nameClaim={"name": "twin", "since": "2026-12-01T09:00:00Z"})  # its old name's claim
    renamed["metadata"]["generation"] = 2
    mds = {("default", "victim"): owner, ("tenant2", "twin"): renamed}
    assert name_owners(mds) == {"victim": ("default", "victim")}
    # a claim the operator confirmed keeps its time even after other spec changes
    owner["metadata"]["generation"] = 7
    assert name_owners(mds) == {"victim": ("default", "victim")}
    # the owner being deleted claims nothing: the name passes on
    owner["metadata"]["deletionTimestamp"] = "2026-12-01T11:00:00Z"
    assert name_owners(mds) == {"victim": ("tenant2", "twin")}


def test_spec_routing_becomes_the_routes_policy_and_what_the_schema_refuses_is_unset():
    md = modeldeployment("m")
    md["spec"]["routing"] = {"policy": "round-robin", "epsilon": 0.5}
    spec = desired_routes({("llm", "m"): md}, {})["m"]
    assert (spec.routing_policy, spec.routing_epsilon) == ("round-robin", 0.5)
    md["spec"]["routing"] = {"policy": "random", "epsilon": 0}
    spec = desired_routes({("llm", "m"): md}, {})["m"]
    assert (spec.routing_policy, spec.routing_epsilon) == (None, None)
    assert desired_routes({("llm", "m"): modeldeployment("m")}, {})["m"].routing_policy is None
