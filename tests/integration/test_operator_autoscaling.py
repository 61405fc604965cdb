"""The real operator's autoscaler against the in-memory API: demand scraped from stand-in gateways behind the
gateway Service's EndpointSlices, the count written through the scale subresource, status.autoscaling, a wake from
zero, a gateway that stops answering, and an HPA or KEDA ScaledObject that owns the count instead."""
from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import orjson
import pytest
from test_operator import Cluster, md

from cxygpt_gateway.discovery.kubernetes import WAKE_PATCH
from harness import free_port, wait_until

pytestmark = pytest.mark.timeout(120)
INTERVAL = "0.3"


class FakeGateway:
    """A gateway's /metrics with a demand the test sets; `down` makes it answer 500."""

    def __init__(self):
        self.demand: dict[str, float] = {}
        self.down = False
        self.scrapes = 0
        gateway = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                gateway.scrapes += 1
                if gateway.down:
                    self.send_response(500)
                    self.end_headers()
                    return
                body = "# HELP cxygpt_gateway_demand d\n# TYPE cxygpt_gateway_demand gauge\n" + "".join(
                    f'cxygpt_gateway_demand{{model="{m}"}} {v}\n' for m, v in gateway.demand.items())
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, *args):
                pass

        self.port = free_port()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()


@pytest.fixture
def scaled(kube_api, tmp_path):
    c = Cluster(kube_api, tmp_path)
    gateways = [FakeGateway(), FakeGateway()]
    c.add_node("gpu-80g")
    c.apply([{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "cxygpt-gateway", "namespace": "default"},
              "spec": {"ports": [{"name": "http", "port": 80}]}},
             {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
              "metadata": {"name": "cxygpt-gateway-a", "namespace": "default",
                           "labels": {"kubernetes.io/service-name": "cxygpt-gateway"}},
              "ports": [{"name": "http", "port": gateways[0].port}],
              "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": True}}]},
             {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
              "metadata": {"name": "cxygpt-gateway-b", "namespace": "default",
                           "labels": {"kubernetes.io/service-name": "cxygpt-gateway"}},
              "ports": [{"name": "http", "port": gateways[1].port}],
              "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": True}}]}])
    c.start_operator("--gateway-service", "default/cxygpt-gateway", "--autoscale-interval", INTERVAL)
    yield c, gateways
    c.operator.stop()
    for g in gateways:
        g.stop()


def autoscaled(name, **autoscaling):
    return md(name, profile="SRV_80G", int4=False, replicas=1, engine={"kind": "sim"},
              autoscaling={"minReplicas": 0, "maxReplicas": 3, "targetInFlightPerReplica": 2,
                           "scaleDownDelaySeconds": 3, **autoscaling})


def replicas(c, name):
    return c.md(name)["spec"]["replicas"]


def events(c, name):
    items = c.core.list_namespaced_event("default").items
    return [(e.type, e.reason, e.message) for e in items if e.involved_object.name == name]


def test_the_count_follows_the_demand_of_every_gateway_and_goes_to_zero_after_the_delay(scaled):
    c, (a, b) = scaled
    a.demand["chat"], b.demand["chat"] = 2.5, 2.4          # 4.9 over two gateways: ceil(4.9 / 2) = 3
    c.apply(autoscaled("chat"))
    status = c.wait_status("chat", lambda s: (s.get("autoscaling") or {}).get("desiredReplicas") == 3, timeout=20,
                           what="scaled up to 3")["autoscaling"]
    assert replicas(c, "chat") == 3
    wait_until(lambda: c.deployment("chat")["spec"]["replicas"] == 3, what="the engine Deployment scaled")
    assert status["gateways"] == "2/2" and status["demand"] == 4.9 and status["target"] == 2
    assert status["lastScaleMessage"].startswith("1 -> 3") and status["scaler"] == "Operator"
    wait_until(lambda: ("Normal", "ScaledUp") in {e[:2] for e in events(c, "chat")}, what="a ScaledUp Event")

    a.demand["chat"] = b.demand["chat"] = 0
    quiet = time.monotonic()
    c.wait_status("chat", lambda s: (s.get("autoscaling") or {}).get("reason") == "ScaleDownStabilized",
                  what="held for the window")
    wait_until(lambda: replicas(c, "chat") == 0, timeout=20, what="scaled to zero")
    assert time.monotonic() - quiet >= 3 - 0.5   # not before the delay (one interval's slack for the last read)
    status = c.wait_status("chat", lambda s: s.get("phase") == "ScaledToZero", what="ScaledToZero")
    assert status["autoscaling"]["lastScaleMessage"] == "3 -> 0: no demand for 3 s"
    available = next(x for x in status["conditions"] if x["type"] == "Available")
    assert "autoscaler after 3 s without requests" in available["message"]
    wait_until(lambda: c.deployment("chat")["spec"]["replicas"] == 0, what="the engine Deployment at zero")

    # a gateway wakes it for a request (0 -> 1 on the scale subresource) before any demand is read
    wake = orjson.loads(WAKE_PATCH)
    r = httpx.patch(c.kube_api.url + "/apis/cxygpt.io/v1alpha1/namespaces/default/modeldeployments/chat/scale",
                    headers={"Content-Type": "application/json-patch+json"}, json=wake)
    assert r.status_code == 200
    c.wait_status("chat", lambda s: (s.get("autoscaling") or {}).get("reason") == "Woken", what="woken")
    woke = time.monotonic()
    wait_until(lambda: replicas(c, "chat") == 0, timeout=20, what="asleep again")
    assert time.monotonic() - woke >= 3 - 0.5   # kept for the window although no demand was ever read


def test_a_gateway_that_stops_answering_blocks_scale_down_but_not_scale_up(scaled):
    c, (a, b) = scaled
    a.demand["chat"], b.demand["chat"] = 0, 3
    c.apply(autoscaled("chat", scaleDownDelaySeconds=1))
    wait_until(lambda: replicas(c, "chat") == 2, timeout=20, what="two replicas")
    b.down = True
    # its last reading stands in for it a few intervals, then its share is unknown: the count does not drop
    c.wait_status("chat", lambda s: (s.get("autoscaling") or {}).get("gateways") == "1/2", timeout=20,
                  what="one of two gateways read")
    time.sleep(2)
    assert replicas(c, "chat") == 2
    assert c.md("chat")["status"]["autoscaling"]["reason"] == "IncompleteMetrics"
    a.demand["chat"] = 5.5
    wait_until(lambda: replicas(c, "chat") == 3, timeout=20, what="scaled up on what is known")


def test_an_hpa_or_a_scaled_object_owns_the_count_instead(scaled):
    c, (a, b) = scaled
    a.demand["chat"] = 6
    c.apply(autoscaled("chat", maxReplicas=2))
    wait_until(lambda: replicas(c, "chat") == 2, timeout=20, what="two replicas")
    hpa = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
           "metadata": {"name": "chat-hpa", "namespace": "default"},
           "spec": {"scaleTargetRef": {"apiVersion": "cxygpt.io/v1alpha1", "kind": "ModelDeployment", "name": "chat"},
                    "minReplicas": 1, "maxReplicas": 4,
                    "metrics": [{"type": "Resource", "resource": {"name": "cpu", "target": {
                        "type": "Utilization", "averageUtilization": 50}}}]}}
    c.apply(hpa)
    status = c.wait_status("chat", lambda s: (s.get("autoscaling") or {}).get("reason") == "ConflictingAutoscaler",
                           what="the conflict shown")["autoscaling"]
    assert status["active"] is False and status["scaler"] == "HorizontalPodAutoscaler default/chat-hpa"
    assert not status["scaleFromZero"] and "remove one of them" in status["message"]
    wait_until(lambda: ("Warning", "ConflictingAutoscaler") in {e[:2] for e in events(c, "chat")},
               what="a ConflictingAutoscaler Event")
    c.kubectl("scale", "md", "chat", "--replicas=4")       # the HPA's write: left alone
    a.demand["chat"] = 0
    time.sleep(2)
    assert replicas(c, "chat") == 4
    c.kubectl("delete", "horizontalpodautoscalers.v2.autoscaling", "chat-hpa")
    wait_until(lambda: replicas(c, "chat") == 2, timeout=20, what="the operator's again (max 2)")

    # KEDA instead of spec.autoscaling: the operator writes nothing, the gateway holds requests at zero
    c.apply({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
             "metadata": {"name": "scaledobjects.keda.sh"},
             "spec": {"group": "keda.sh", "scope": "Namespaced",
                      "names": {"kind": "ScaledObject", "plural": "scaledobjects", "singular": "scaledobject"},
                      "versions": [{"name": "v1alpha1", "served": True, "storage": True, "schema": {
                          "openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}}]}})
    plain = md("plain", profile="SRV_80G", int4=False, replicas=0, engine={"kind": "sim"})
    c.apply(plain)
    c.apply({"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "metadata": {"name": "plain", "namespace": "default"},
             "spec": {"scaleTargetRef": {"apiVersion": "cxygpt.io/v1alpha1", "kind": "ModelDeployment", "name": "plain"},
                      "minReplicaCount": 0, "maxReplicaCount": 2, "triggers": [{"type": "prometheus", "metadata": {}}]}})
    status = c.wait_status("plain", lambda s: (s.get("autoscaling") or {}).get("reason") == "ExternalAutoscaler",
                           what="KEDA shown")["autoscaling"]
    assert status == {"scaler": "ScaledObject default/plain", "active": False, "scaleFromZero": True,
                      "reason": "ExternalAutoscaler", "message": status["message"]}
    c.kubectl("delete", "scaledobject", "plain")
    c.wait_status("plain", lambda s: "autoscaling" not in s, what="nothing left of it")


def test_an_operator_restart_keeps_the_decisions(scaled):
    c, (a, b) = scaled
    a.demand["chat"] = 5
    c.apply(autoscaled("chat", scaleDownDelaySeconds=10))
    wait_until(lambda: replicas(c, "chat") == 3, timeout=20, what="three replicas")
    a.demand["chat"] = 0
    quiet = time.monotonic()
    time.sleep(1)
    c.operator.stop()
    before = c.md("chat")["status"]["autoscaling"]
    assert before["reason"] == "ScaleDownStabilized" and before["recommendations"]
    c.start_operator("--gateway-service", "default/cxygpt-gateway", "--autoscale-interval", INTERVAL)
    restarted = time.monotonic() - quiet
    wait_until(lambda: replicas(c, "chat") == 0, timeout=30, what="scaled to zero after the restart")
    elapsed = time.monotonic() - quiet
    print(f"restarted after {restarted:.2f} s, at zero after {elapsed:.2f} s")
    # counted from the last demand, not from the restart (which would be 10 s after it at the earliest) nor at once;
    # a slow restart (two test workers on two cores) may decide only once it is up
    assert 10 - 0.5 <= elapsed < min(restarted + 10 - 0.5, max(10, restarted) + 2), (restarted, elapsed)
    # the scale is written first, the status after it
    c.wait_status("chat", lambda s: (s.get("autoscaling") or {}).get("lastScaleMessage") == "3 -> 0: no demand for 10 s",
                  timeout=5, what="the scale-down recorded")
