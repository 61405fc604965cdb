"""Failover without replay, with real processes: a replica that refuses connections is skipped for the next one;
with none left the client gets a 503 it may safely retry; the queue moves when a replica comes back."""
from __future__ import annotations

import concurrent.futures

import httpx
from test_gateway_support import metric, start_gateway, start_sim

from harness import ServerProcess, wait_until

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
# the health check would take a dead replica out within its interval; these tests are about what happens before
NO_HEALTH_CHECKS = {"CXYGPT_HEALTH_INTERVAL_S": "3600"}


def gateway_for(tmp_path, *sims, env=NO_HEALTH_CHECKS):
    # least-load: idle replicas are taken in the order listed, whatever their ports hash to (prefix routing)
    config = {"models": [{"name": "m", "urls": [s.url for s in sims], "profile": "SRV_MULTI_80G",
                          "routing": {"policy": "least-load"}}]}
    return start_gateway(tmp_path, config, env=env)


def test_a_replica_that_refuses_connections_is_skipped_for_the_next_one(tmp_path):
    alive, doomed = start_sim(tmp_path, "m", ttft_ms=1, itl_ms=1), start_sim(tmp_path, "m", ttft_ms=1, itl_ms=1)
    gateway = gateway_for(tmp_path, doomed, alive)  # the doomed one first: idle replicas are taken in order
    try:
        doomed.kill()  # the port now refuses connections; the gateway has not noticed
        codes = [httpx.post(gateway.url + "/v1/chat/completions", json=CHAT, timeout=10).status_code
                 for _ in range(6)]
        assert codes == [200] * 6
        assert metric(gateway.url, "cxygpt_gateway_failovers_total", model="m") >= 1
    finally:
        gateway.stop()
        alive.stop()


def test_with_no_replica_left_the_answer_is_a_503_to_retry_not_a_502(tmp_path):
    sim = start_sim(tmp_path, "m", ttft_ms=1, itl_ms=1)
    gateway = gateway_for(tmp_path, sim)
    try:
        sim.kill()
        r = httpx.post(gateway.url + "/v1/chat/completions", json=CHAT, timeout=10)
        assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1
        assert "nothing of the request was sent" in r.json()["error"]["message"]
        r = httpx.post(gateway.url + "/v1/chat/completions", json=CHAT, timeout=10)  # now out of rotation
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_ready_replica"
    finally:
        gateway.stop()


def test_a_replica_back_after_its_pause_serves_again(tmp_path):
    sim = start_sim(tmp_path, "m", ttft_ms=1, itl_ms=1)
    gateway = gateway_for(tmp_path, sim, env={"CXYGPT_HEALTH_INTERVAL_S": "0.5"})
    argv, port = sim.argv, sim.port
    try:
        sim.kill()
        assert httpx.post(gateway.url + "/v1/chat/completions", json=CHAT, timeout=10).status_code == 503
        sim = ServerProcess(argv, port=port, log_path=tmp_path / "sim-again.log").start()  # restarted, same port
        wait_until(lambda: httpx.post(gateway.url + "/v1/chat/completions", json=CHAT, timeout=10).status_code == 200,
                   timeout=15, what="served again once the replica is back")
    finally:
        gateway.stop()
        sim.stop()


def test_a_refused_request_waits_ahead_of_the_line_when_the_other_replicas_are_busy(tmp_path):
    alive = start_sim(tmp_path, "m", ttft_ms=1, itl_ms=20)
    doomed = start_sim(tmp_path, "m", ttft_ms=1, itl_ms=1)
    # least-load, so the first request takes the first replica listed (`alive`) whatever the ports hash to
    config = {"models": [{"name": "m", "urls": [alive.url, doomed.url], "profile": "SRV_MULTI_80G",
                          "routing": {"policy": "least-load"},
                          "limits": {"max_concurrency": 1, "timeouts": {"queue_s": 10}}}]}
    gateway = start_gateway(tmp_path, config, env=NO_HEALTH_CHECKS)
    try:
        with httpx.Client(timeout=30) as http, concurrent.futures.ThreadPoolExecutor(1) as pool:
            slow = pool.submit(http.post, gateway.url + "/v1/chat/completions",
                               json={**CHAT, "max_tokens": 50, "ignore_eos": True})  # holds the one slot of `alive`
            wait_until(lambda: metric(gateway.url, "cxygpt_gateway_in_flight", model="m") == 1, what="slow one in")
            doomed.kill()  # `doomed` looks idle and healthy to the gateway, and refuses the next request
            r = http.post(gateway.url + "/v1/chat/completions", json=CHAT)
            assert r.status_code == 200, r.text  # waited for `alive` instead of a 503
            assert slow.result().status_code == 200
        assert metric(gateway.url, "cxygpt_gateway_failovers_total", model="m") == 1
        assert metric(gateway.url, "cxygpt_gateway_in_flight", model="m") == 0  # no slot leaked
    finally:
        gateway.stop()
        alive.stop()
