"""Prometheus exposition: vLLM's metric names, types and labels, fed by scheduler progress."""
from prometheus_client.parser import text_string_to_metric_families

from cxygpt_sim.engine import Capacity, Scheduler, Sequence
from cxygpt_sim.metrics import EngineMetrics
from cxygpt_sim.speed import Speed

SPEED = Speed(ttft_ms=100, itl_ms=10, prefill_ms_per_1k=0, itl_batch_slope=0)


def families(metrics: EngineMetrics) -> dict:
    return {f.name: f for f in text_string_to_metric_families(metrics.exposition().decode())}


def sample(family, suffix=""):
    return {s.name: s.value for s in family.samples}[family.name + suffix]


def test_names_types_and_labels_match_vllm():
    m = EngineMetrics(Scheduler(Capacity(max_num_seqs=2, kv_blocks=10), SPEED), "qwen3-14b")
    found = families(m)
    expected = {
        "vllm:num_requests_running": "gauge", "vllm:num_requests_waiting": "gauge",
        "vllm:kv_cache_usage_perc": "gauge", "vllm:prompt_tokens": "counter", "vllm:generation_tokens": "counter",
        "vllm:request_success": "counter", "vllm:num_preemptions": "counter",
        "vllm:time_to_first_token_seconds": "histogram", "vllm:time_per_output_token_seconds": "histogram",
        "vllm:inter_token_latency_seconds": "histogram", "vllm:request_time_per_output_token_seconds": "histogram",
        "vllm:e2e_request_latency_seconds": "histogram", "vllm:request_queue_time_seconds": "histogram",
        "vllm:prefix_cache_queries": "counter", "vllm:prefix_cache_hits": "counter",
        "vllm:iteration_tokens_total": "histogram"}
    assert {name: found[name].type for name in expected} == expected
    assert found["vllm:num_requests_running"].samples[0].labels == {"model_name": "qwen3-14b", "engine": "0"}
    text = m.exposition().decode()
    assert "vllm:prompt_tokens_total{" in text and "vllm:request_success_total{" in text


def test_gauges_read_the_scheduler_and_events_feed_counters_and_histograms():
    s = Scheduler(Capacity(max_num_seqs=1, kv_blocks=10, block_size=16), SPEED)
    m = EngineMetrics(s, "m")
    a, b = (Sequence(id=str(i), prompt_ids=list(range(i, i + 20)), output_tokens=3, arrived=0.0) for i in range(2))
    s.submit(a)
    s.submit(b)
    step = s.begin_step(0.0)
    now = step.duration_s
    f = families(m)
    assert (sample(f["vllm:num_requests_running"]), sample(f["vllm:num_requests_waiting"])) == (1, 1)
    assert sample(f["vllm:kv_cache_usage_perc"]) == 0.2
    m.record_step(step, s.end_step(now), now)
    while a.state != "finished":
        step = s.begin_step(now)
        now += step.duration_s
        m.record_step(step, s.end_step(now), now)
    m.record_finish("length")
    s.cancel(b)
    m.record_abort(b, now)
    f = families(m)
    assert sample(f["vllm:prompt_tokens"], "_total") == 20
    assert sample(f["vllm:generation_tokens"], "_total") == 3
    assert sample(f["vllm:time_to_first_token_seconds"], "_count") == 1
    assert sample(f["vllm:time_to_first_token_seconds"], "_sum") == 0.1
    assert sample(f["vllm:inter_token_latency_seconds"], "_count") == 2
    assert sample(f["vllm:time_per_output_token_seconds"], "_count") == 2
    assert sample(f["vllm:e2e_request_latency_seconds"], "_count") == 2
    success = {s.labels["finished_reason"]: s.value for s in f["vllm:request_success"].samples}
    assert (success["length"], success["abort"], success["stop"]) == (1, 1, 0)


def test_instant_decode_records_many_equal_observations_at_once():
    s = Scheduler(Capacity(max_num_seqs=1, kv_blocks=10), Speed(0, 0, 0, 0))
    m = EngineMetrics(s, "m")
    s.submit(Sequence(id="a", prompt_ids=[1, 2, 3, 4, 5], output_tokens=50, arrived=0.0))
    m.record_step(s.begin_step(0.0), s.end_step(0.0), 0.0)
    f = families(m)
    assert sample(f["vllm:inter_token_latency_seconds"], "_count") == 49
    assert sample(f["vllm:generation_tokens"], "_total") == 50


def test_prefix_cache_counters_and_iteration_tokens():
    s = Scheduler(Capacity(max_num_seqs=4, kv_blocks=20, block_size=16), SPEED)
    m = EngineMetrics(s, "m")
    shared = list(range(40))  # two full blocks of 16 and a tail of 8
    now = 0.0
    for i in range(2):
        s.submit(Sequence(id=str(i), prompt_ids=shared, output_tokens=2, arrived=now))
        while s.has_work:
            step = s.begin_step(now)
            now += step.duration_s
            m.record_step(step, s.end_step(now), now)
    f = families(m)
    assert sample(f["vllm:prefix_cache_queries"], "_total") == 80
    assert sample(f["vllm:prefix_cache_hits"], "_total") == 32
    # per request: one prefill step (40 tokens, then 8 after the hit) and one decode step of 1 token
    buckets = {s.labels["le"]: s.value for s in f["vllm:iteration_tokens_total"].samples if s.name.endswith("_bucket")}
    assert (buckets["1"], buckets["8"], buckets["32"], buckets["64"]) == (2, 3, 3, 4)
    assert sample(f["vllm:iteration_tokens_total"], "_sum") == 40 + 8 + 2
