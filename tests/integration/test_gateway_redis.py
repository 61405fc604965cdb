"""Two gateway processes sharing one real Redis enforce one global limit; a dead Redis fails open, counted."""
from __future__ import annotations

import httpx
import pytest
from test_gateway_support import metric, start_gateway, start_redis, start_sim

BODY = {"model": "qwen3-14b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture
def redis(tmp_path):
    proc = start_redis(tmp_path)
    if proc is None:
        pytest.skip("redis-server is not installed (scripts/bootstrap.sh installs it)")
    yield proc
    proc.stop()


def test_two_gateways_share_one_limit_and_fail_open_without_redis(tmp_path, redis):
    sim = start_sim(tmp_path, itl_ms=0)
    # 0.5 requests/s = 5 per 10 s for the model, whichever gateway is asked
    config = {"models": [{"name": "qwen3-14b", "url": sim.url, "profile": "DEV_32G", "limits": {"rate_qps": 0.5}}]}
    env = {"REDIS_URL": f"redis://127.0.0.1:{redis.port}/0"}
    gateways = [start_gateway(tmp_path, config, env=env) for _ in range(2)]
    try:
        answers = [httpx.post(gateways[i % 2].url + "/v1/chat/completions", json=BODY, timeout=10) for i in range(12)]
        codes = [r.status_code for r in answers]
        assert codes.count(200) == 5 and codes.count(429) == 7, codes
        assert all(1 <= int(r.headers["retry-after"]) <= 10 for r in answers if r.status_code == 429)
        assert {codes[i] for i in (0, 1)} == {200}  # both gateways served before the shared budget ran out

        redis.kill()
        codes = [httpx.post(g.url + "/v1/chat/completions", json=BODY, timeout=10).status_code for g in gateways]
        assert codes == [200, 200]
        assert all(metric(g.url, "cxygpt_gateway_ratelimit_storage_errors_total") >= 1 for g in gateways)
    finally:
        for proc in (*gateways, sim):
            proc.stop()
