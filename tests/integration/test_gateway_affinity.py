"""Prefix routing with real processes: simulators with prefix caching behind the gateway, multi-turn conversations
through the official openai SDK. Every turn of a conversation lands on one replica (the one the pure routing
function names), two gateway processes agree, a hot key spills within the load bound, a replica killed mid-run
costs only the requests it was serving, and one that refuses a request sends it to the next replica in its order."""
from __future__ import annotations

import concurrent.futures
import threading
import time

import httpx
import openai
import pytest
from test_gateway_support import metric, start_gateway, start_sim, wait_until

from cxygpt_gateway.routing.keys import request_key
from cxygpt_gateway.routing.policies import load_bound
from cxygpt_gateway.routing.ring import Ring

SYSTEM = {"role": "system", "content": "You are the helpdesk of ACME Corp. Answer briefly and politely. " * 20}
LIMITS = {"rate_qps": 1000, "rate_tpm": 100_000_000, "max_concurrency": 16}
# the health check would take a killed replica out within its interval; the kill test is about what happens before
NO_HEALTH_CHECKS = {"CXYGPT_HEALTH_INTERVAL_S": "3600"}


def config(sims, urls=None):
    return {"models": [{"name": "m", "urls": urls or [s.url for s in sims], "profile": "SRV_MULTI_80G",
                        "limits": LIMITS}]}


def engine_counter(sim, name: str) -> float:
    """A counter of the engine summed over its labels."""
    lines = httpx.get(sim.url + "/metrics", timeout=5).text.splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(name + "{"))


def finished(sims) -> list[float]:
    return [engine_counter(s, "vllm:request_success_total") for s in sims]


def served_by(sims, before: list[float]) -> int:
    """Which engine finished the one request sent since `before` (its counters lag the answer a little)."""
    def one() -> list[int] | None:
        deltas = [a - b for a, b in zip(finished(sims), before)]
        return [deltas.index(1)] if sorted(deltas) == [0] * (len(sims) - 1) + [1] else None
    return wait_until(one, timeout=10, what="the engine that served the request")[0]


def home(sims, messages, exclude=()) -> int:
    """The replica the routing function names for this conversation (the first healthy one on its ring walk)."""
    walk = Ring(s.url for s in sims).walk(request_key("chat", {"messages": messages}))
    urls = [s.url for s in sims]
    return next(urls.index(u) for u in walk if urls.index(u) not in exclude)


def conversations(n, tag):
    return [[SYSTEM, {"role": "user", "content": f"{tag}: I am customer {i} and order {i * 7} is late"}]
            for i in range(n)]


def turn(client, messages, n):
    r = client.chat.completions.create(model="m", messages=messages, max_tokens=6)
    messages += [{"role": "assistant", "content": r.choices[0].message.content},
                 {"role": "user", "content": f"thanks; and question {n}?"}]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("routing")
    sims = [start_sim(tmp, "m", ttft_ms=5, itl_ms=20) for _ in range(3)]
    gateways = []
    try:
        gateways.append(start_gateway(tmp, config(sims)))
        # the same replicas listed the other way round: the ring is built from sorted URLs
        gateways.append(start_gateway(tmp, config(sims, [s.url for s in reversed(sims)])))
        yield sims, gateways
    finally:
        for p in gateways + sims:
            p.stop()


def client_of(gateway):
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key="none", max_retries=0, timeout=30)


def test_every_turn_of_a_conversation_lands_on_the_replica_routing_names(fleet):
    sims, (gateway, _) = fleet
    limits = httpx.get(gateway.url + "/v1/limits").json()["models"]["m"]
    assert limits["routing"] == {"policy": "prefix", "epsilon": 0.25}  # multi-user mode's default
    client = client_of(gateway)
    convs = conversations(8, "sticky")
    expected = [home(sims, c) for c in convs]
    for n in range(3):
        for i, messages in enumerate(convs):
            before, hits = finished(sims), engine_counter(sims[expected[i]], "vllm:prefix_cache_hits_total")
            turn(client, messages, n)
            assert served_by(sims, before) == expected[i], f"conversation {i}, turn {n}"
            if n:  # its history is in that engine's prefix cache
                assert engine_counter(sims[expected[i]], "vllm:prefix_cache_hits_total") > hits
    assert len(set(expected)) > 1  # the shared system prompt does not put every user on one replica


def test_two_gateway_processes_send_a_conversation_to_the_same_replica(fleet):
    sims, gateways = fleet
    clients = [client_of(g) for g in gateways]
    convs = conversations(6, "shared")
    for i, messages in enumerate(convs):
        where = []
        for n, client in enumerate([clients[0], clients[1], clients[0], clients[1]]):
            before = finished(sims)
            turn(client, messages, n)
            where.append(served_by(sims, before))
        assert where == [home(sims, convs[i][:2])] * 4, f"conversation {i}"


def test_a_hot_key_spills_over_within_the_load_bound(fleet):
    sims, (gateway, _) = fleet
    http = httpx.Client(timeout=30, limits=httpx.Limits(max_connections=32))
    before, spills = finished(sims), metric(gateway.url, "cxygpt_gateway_routed_total", choice="spill")
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 40, "ignore_eos": True}
    n = 12  # all in flight at once (40 tokens at 20 ms each), one session
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        codes = list(pool.map(lambda _: http.post(gateway.url + "/v1/chat/completions", json=body,
                                                  headers={"x-session-id": "hot"}).status_code, range(n)))
    assert codes == [200] * n
    wait_until(lambda: sum(finished(sims)) - sum(before) == n, timeout=10, what="every request counted")
    per_replica = [a - b for a, b in zip(finished(sims), before)]
    assert max(per_replica) <= load_bound(0.25, n - 1, len(sims)) and sorted(per_replica)[1] > 0
    assert metric(gateway.url, "cxygpt_gateway_routed_total", choice="spill") - spills >= n - max(per_replica)


def test_a_killed_replica_costs_only_the_requests_it_was_serving_and_a_refused_one_takes_the_next_in_order(
        tmp_path):
    sims = [start_sim(tmp_path, "m", ttft_ms=5, itl_ms=10) for _ in range(4)]
    gateway = start_gateway(tmp_path, config(sims), env=NO_HEALTH_CHECKS)
    try:
        client = client_of(gateway)
        convs = conversations(9, "doomed")
        homes = [home(sims, c) for c in convs]
        victim = homes[0]
        outcomes: list[tuple[int, float, float, str | None]] = []  # conversation, sent, answered, error
        lock, killed_at = threading.Lock(), []

        def chat(i):
            for n in range(8):
                sent = time.monotonic()
                try:
                    turn(client, convs[i], n)
                    error = None
                except openai.APIError as e:
                    error = repr(e)
                    convs[i] += [{"role": "assistant", "content": ""}, {"role": "user", "content": "again?"}]
                with lock:
                    outcomes.append((i, sent, time.monotonic(), error))

        with concurrent.futures.ThreadPoolExecutor(len(convs)) as pool:
            running = [pool.submit(chat, i) for i in range(len(convs))]
            wait_until(lambda: len(outcomes) >= 10, timeout=30, what="the conversations under way")
            killed_at.append(time.monotonic())
            sims[victim].kill()
            for f in running:
                f.result()
        kill = killed_at[0]
        assert len(outcomes) == 8 * len(convs)  # every request got an answer
        for i, sent, answered, error in outcomes:
            if error is not None:  # only what the dead engine was serving: in flight when it died
                assert sent < kill + 0.2 and answered > kill, (i, error)
        assert any(homes[i] == victim and sent > kill + 0.2 for i, sent, _, _ in outcomes)  # and it was asked again
        assert metric(gateway.url, "cxygpt_gateway_failovers_total", model="m") >= 1
        # afterwards each conversation stays on one replica: where its history is. That is its home, unless its home
        # was the victim or was full when a turn came (the load bound sent it on, and its history with it): under a
        # slow machine some are, so only most conversations are asked to be home
        alive = [s for k, s in enumerate(sims) if k != victim]
        at_home = 0
        for i in range(len(convs)):
            places = []
            for n in (98, 99):
                before = finished(alive)
                turn(client, convs[i], n)
                places.append(served_by(alive, before))
            assert places[0] == places[1], (i, places)
            at_home += homes[i] != victim and alive[places[0]] is sims[homes[i]]
        assert at_home >= sum(h != victim for h in homes) / 2, (at_home, homes, victim)

        # a replica that refuses the connection (dead, the gateway does not know yet): its conversation goes to the
        # next replica on its ring, not merely to a free one (the first of the others in line, here)
        second = next(k for k in range(len(sims)) if k != victim)
        alive = [s for k, s in enumerate(sims) if k not in (victim, second)]
        probe = next(c for c in conversations(400, "probe") if home(sims, c) == second
                     and home(sims, c, exclude=(victim, second)) != sims.index(alive[0]))
        sims[second].kill()
        before, others = finished(alive), metric(gateway.url, "cxygpt_gateway_routed_total", choice="other")
        turn(client, probe, 0)
        assert alive[served_by(alive, before)] is sims[home(sims, probe, exclude=(victim, second))]
        assert metric(gateway.url, "cxygpt_gateway_routed_total", choice="other") == others + 1
    finally:
        gateway.stop()
        for s in sims:
            s.stop()
