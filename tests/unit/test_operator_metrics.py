"""Operator metrics: phases with zeros, time to Ready only on the first Ready (never again after a restart)."""
from prometheus_client import generate_latest

from cxygpt_operator.metrics import OperatorMetrics
from cxygpt_profiles import GpuNode


def body(phase=None, generation=1):
    return {"metadata": {"uid": "u1", "generation": generation, "creationTimestamp": "2026-01-01T00:00:00Z"},
            "status": {"phase": phase} if phase else {}}


def text(metrics):
    return generate_latest(metrics.registry).decode()


def test_phases_by_profile_report_zeros_and_follow_the_models():
    m = OperatorMetrics()
    m.model_seen(("ns", "a"), body(), {"phase": "Starting", "profile": "SRV_80G"})
    out = text(m)
    assert 'cxygpt_operator_model_deployments{phase="Starting",profile="SRV_80G"} 1.0' in out
    assert 'cxygpt_operator_model_deployments{phase="Ready",profile="SRV_80G"} 0.0' in out
    m.model_gone(("ns", "a"))
    assert 'cxygpt_operator_model_deployments{phase="Starting",profile="SRV_80G"} 0.0' in text(m)


def test_time_to_ready_once_and_not_after_a_restart():
    m = OperatorMetrics()
    m.model_seen(("ns", "a"), body("Starting"), {"phase": "Ready", "profile": "P"})
    m.model_seen(("ns", "a"), body("Ready"), {"phase": "Ready", "profile": "P"})
    restarted = OperatorMetrics()  # a new process sees the stored Ready status
    restarted.model_seen(("ns", "a"), body("Ready"), {"phase": "Ready", "profile": "P"})
    m.model_seen(("ns", "b"), body("Starting", generation=2), {"phase": "Ready", "profile": "P"})  # a rollout
    assert "cxygpt_operator_time_to_ready_seconds_count 1.0" in text(m)
    assert "cxygpt_operator_time_to_ready_seconds_count 0.0" in text(restarted)


def test_gpu_nodes_by_memory_class():
    m = OperatorMetrics()
    m.observed.gpu_nodes = [GpuNode(81559, 8, "a"), GpuNode(81559, 1, "b"), GpuNode(32607, 1, "c")]
    out = text(m)
    assert 'cxygpt_operator_gpu_nodes{memory_class="79GiB"} 2.0' in out
    assert 'cxygpt_operator_gpus{memory_class="79GiB"} 9.0' in out
    assert 'cxygpt_operator_gpu_nodes{memory_class="31GiB"} 1.0' in out


def test_caches_are_counted_once_however_many_models_share_them():
    m = OperatorMetrics()
    shared = {"claimName": "cxygpt-cache-x-1", "phase": "Downloading", "bytesDone": 5, "bytesTotal": 9}
    m.model_seen(("ns", "a"), body(), {"phase": "Pending", "profile": "P", "cache": shared})
    m.model_seen(("ns", "b"), body(), {"phase": "Pending", "profile": "P", "cache": shared})
    m.model_seen(("ns", "c"), body(), {"phase": "Ready", "profile": "P",
                                       "cache": {"claimName": "cxygpt-cache-y-2", "phase": "Ready"}})
    out = text(m)
    assert 'cxygpt_operator_model_caches{phase="Downloading"} 1.0' in out
    assert 'cxygpt_operator_model_caches{phase="Ready"} 1.0' in out
    assert 'cxygpt_operator_model_caches{phase="Failed"} 0.0' in out
    assert 'cxygpt_operator_model_cache_bytes{claim="cxygpt-cache-x-1",kind="done",namespace="ns"} 5.0' in out
    m.model_gone(("ns", "a"))
    m.model_gone(("ns", "b"))
    assert 'cxygpt_operator_model_caches{phase="Downloading"} 0.0' in text(m)
