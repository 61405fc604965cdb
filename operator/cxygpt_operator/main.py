"""`cxygpt-operator`: runs the kopf operator (namespaced or cluster-wide) with a liveness endpoint."""
from __future__ import annotations

import argparse
import os
import secrets
import sys

from cxygpt_profiles import ProfileTableError, load_catalog, load_table

from . import logs
from .autoscaling.policy import DEFAULT_INTERVAL_S
from .logs import FORMATS
from .placement import PodSettings, SettingsError, load_defaults

DEFAULT_SIM_IMAGE = "cxygpt/cxygpt-sim:0.1.0"


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="cxygpt-operator", description=__doc__)
    scope = ap.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", default=[],
                       help="watch this namespace (repeatable; globs allowed); default: all namespaces")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch the whole cluster (default)")
    ap.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster, $KUBECONFIG or ~/.kube/config)")
    ap.add_argument("--liveness", default="http://0.0.0.0:8080/healthz",
                    help="liveness endpoint URL (default http://0.0.0.0:8080/healthz; 'off' disables)")
    ap.add_argument("--metrics-port", type=int, default=8081,
                    help="Prometheus /metrics port (default 8081; 0 disables)")
    ap.add_argument("--metrics-host", default="0.0.0.0", help="Prometheus listen address (default 0.0.0.0)")
    ap.add_argument("--priority", type=int, help="kopf peering priority: the highest live peer runs, others "
                    "stand by (default with --peering: random per start, so two replicas never tie and all pause)")
    ap.add_argument("--peering", metavar="NAME",
                    help="kopf peering object for several replicas (one active at a time); default standalone")
    ap.add_argument("--profiles", help="profiles.yaml (default: the packaged table or $CXYGPT_PROFILES)")
    ap.add_argument("--models", help="models.yaml catalog (default: the packaged catalog or $CXYGPT_MODELS)")
    ap.add_argument("--vllm-image", help="engine image for kind vllm (default: the table's pinned image)")
    ap.add_argument("--sim-image", default=os.environ.get("CXYGPT_SIM_IMAGE", DEFAULT_SIM_IMAGE),
                    help=f"engine image for kind sim (default {DEFAULT_SIM_IMAGE})")
    ap.add_argument("--loader-image", default=os.environ.get("CXYGPT_LOADER_IMAGE"),
                    help="image of the model cache's download Jobs (default the operator's image, "
                         "cxygpt/cxygpt-operator:0.1.0, which has the loader)")
    ap.add_argument("--hf-endpoint", default=os.environ.get("HF_ENDPOINT"),
                    help="the Hugging Face Hub (or a mirror of it) that the cache's download Jobs and engines that "
                         "download their own weights use (HF_ENDPOINT; default the public Hub)")
    ap.add_argument("--engine-defaults", metavar="FILE",
                    help="YAML of the engine pods' default settings (nodeSelector, affinity, tolerations, "
                    "runtimeClassName, priorityClassName, resources, podLabels, podAnnotations), which each "
                    "ModelDeployment's spec.engine overrides (the chart renders it from engines.*)")
    ap.add_argument("--metrics-namespace", action="append", default=[], metavar="NS",
                    help="a namespace whose pods may scrape engine metrics through each model's NetworkPolicy "
                    "(repeatable; e.g. Prometheus'); the gateway's pods are let in by their label")
    ap.add_argument("--gateway-namespace", action="append", default=[], metavar="NS",
                    help="the namespace of the gateway's pods (repeatable): each model's NetworkPolicy lets in pods "
                    "labelled cxygpt.io/engine-access=true from these namespaces only (default: from any namespace)")
    ap.add_argument("--no-network-policy", action="store_true",
                    help="make no NetworkPolicy per model (and remove ours): engines are then reachable by any pod")
    ap.add_argument("--gateway-service", metavar="NAMESPACE/NAME",
                    help="the gateway's Service: its ready endpoints are scraped for the demand that spec.autoscaling "
                    "follows (without it, autoscaled models keep their count and only wake from zero)")
    ap.add_argument("--autoscale-interval", type=float, default=DEFAULT_INTERVAL_S, metavar="SECONDS",
                    help=f"how often autoscaled models decide, reading the gateways (default {DEFAULT_INTERVAL_S:g})")
    ap.add_argument("--log-format", choices=FORMATS, default="json",
                    help="json (default: one object per line, as the gateway's) or text")
    ap.add_argument("-v", "--verbose", action="store_true")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(sys.argv[1:] if argv is None else argv)
    logs.configure(a.log_format, a.verbose)
    gateway_service = tuple(a.gateway_service.split("/", 1)) if a.gateway_service else None
    if gateway_service is not None and (len(gateway_service) != 2 or not all(gateway_service)):
        print(f"cxygpt-operator: --gateway-service {a.gateway_service!r} is not NAMESPACE/NAME", file=sys.stderr)
        return 2
    if a.autoscale_interval <= 0:
        print("cxygpt-operator: --autoscale-interval must be above 0", file=sys.stderr)
        return 2
    try:  # a broken table or defaults file stops the operator here, with the field named
        table, catalog = load_table(a.profiles), load_catalog(a.models)
        engine_defaults = load_defaults(a.engine_defaults) if a.engine_defaults else PodSettings()
    except (ProfileTableError, SettingsError) as e:
        print(f"cxygpt-operator: {e}", file=sys.stderr)
        return 2
    if a.kubeconfig:
        os.environ["KUBECONFIG"] = a.kubeconfig

    import kopf  # imported after the environment is settled
    from prometheus_client import start_http_server

    from .autoscaling.demand import DemandReader
    from .autoscaling.step import Scaler
    from .handlers import Shared  # importing registers the handlers
    from .kube import Kube, api_client
    from .manifests import DEFAULT_LOADER_IMAGE, EngineImages
    from .reconcile import Context

    kube = Kube(api_client(a.kubeconfig))
    list_slices = (lambda: kube.list_endpoint_slices(*gateway_service)) if gateway_service else None
    scaler = Scaler(kube, DemandReader(list_slices, interval_s=a.autoscale_interval), interval_s=a.autoscale_interval)
    context = Context(table=table, catalog=catalog, kube=kube,
                      images=EngineImages(vllm=a.vllm_image or table.vllm.image, sim=a.sim_image,
                                          loader=a.loader_image or DEFAULT_LOADER_IMAGE),
                      network_policy=not a.no_network_policy, metrics_namespaces=tuple(a.metrics_namespace),
                      gateway_namespaces=tuple(a.gateway_namespace), hf_endpoint=a.hf_endpoint or None,
                      engine_defaults=engine_defaults)
    shared = Shared()
    if a.metrics_port:
        start_http_server(a.metrics_port, addr=a.metrics_host, registry=shared.metrics.registry)
    kopf.run(
        clusterwide=not a.namespace,
        namespaces=a.namespace,
        standalone=a.peering is None,
        peering_name=a.peering,
        priority=a.priority if a.priority is not None else (secrets.randbelow(2**31 - 1) + 1 if a.peering else 0),
        liveness_endpoint=None if a.liveness == "off" else a.liveness,
        memo=kopf.Memo(context=context, shared=shared, scaler=scaler),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
