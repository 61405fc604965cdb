"""LoRA adapters through the gateway with real simulators (--enable-lora) and the official openai SDK: a base model and
two adapters loaded on some of its replicas only; every adapter request lands on a replica that has it (the engines'
own counters), none is lost; an adapter loaded at runtime elsewhere starts taking requests there, an unloaded one
stops; each adapter has its own rate budget; /v1/models lists the adapters with their parent."""
from __future__ import annotations

import concurrent.futures

import httpx
import openai
import pytest
from test_gateway_support import metric, start_gateway, wait_until

from cxygpt_dev.hub import make_adapter_repo
from harness import ServerProcess, console_script, free_port

pytestmark = pytest.mark.timeout(300)
BASE = "qwen3-14b"
LIMITS = {"rate_qps": 1000, "rate_tpm": 100_000_000, "max_concurrency": 2}
MESSAGES = [{"role": "user", "content": "Write a short SQL query that counts the orders of this week."}]


def start_lora_sim(tmp, repos: dict, loaded: tuple[str, ...]) -> ServerProcess:
    port = free_port()
    argv = [console_script("cxygpt-sim"), "serve", "Qwen/Qwen3-14B", "--served-model-name", BASE, "--host",
            "127.0.0.1", "--port", str(port), "--max-model-len", "4096", "--max-num-seqs", "8", "--ttft-ms", "5",
            "--itl-ms", "10", "--sim-jitter", "0", "--sim-seed", "1", "--enable-lora", "--max-loras", "2",
            "--max-cpu-loras", "4", "--sim-lora-load-gib-per-s", "0",
            *(["--lora-modules", *(f"{name}={repos[name]}" for name in loaded)] if loaded else [])]
    return ServerProcess(argv, port=port, log_path=tmp / f"sim-{port}.log",
                         env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}).start()


def finished(sim) -> float:
    """Requests the engine finished (vllm:request_success_total, summed over its reasons)."""
    lines = httpx.get(sim.url + "/metrics", timeout=5).text.splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith("vllm:request_success_total{"))


def finished_all(sims) -> list[float]:
    return [finished(s) for s in sims]


def settled(sims, before: list[float], total: int) -> list[float]:
    """Each engine's finished requests since `before`, once they add up to `total` (the counters lag the answers)."""
    return wait_until(lambda: (d := [a - b for a, b in zip(finished_all(sims), before)]) and sum(d) >= total and d,
                      timeout=20, what=f"{total} requests counted by the engines")


def ask(client, model: str, n: int, *, max_tokens: int = 8, workers: int = 6) -> list[str]:
    """n requests at once (up to `workers` in flight); the answers' model names. Any failure raises."""
    def one(_):
        r = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=max_tokens)
        return r.model
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, range(n)))


def loaded_on(gateway, adapter: str) -> int:
    return httpx.get(gateway.url + "/v1/limits", params={"model": adapter}, timeout=5).json()["models"][adapter][
        "loaded_on"]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """Three replicas of the base: the first has sql, the second sql and chat, the third neither."""
    tmp = tmp_path_factory.mktemp("adapters")
    repos = {name: make_adapter_repo(tmp / "repos", f"t/{name}", base_model="Qwen/Qwen3-14B")
             for name in ("sql", "chat")}
    sims = []
    try:
        for loaded in (("sql",), ("sql", "chat"), ()):
            sims.append(start_lora_sim(tmp, repos, loaded))
        gateway = start_gateway(tmp, {
            "engine_metrics_interval_s": 0.2, "adapter_wait_s": 2,
            "models": [{"name": BASE, "urls": [s.url for s in sims], "profile": "SRV_MULTI_80G", "limits": LIMITS,
                        "adapters": ["sql", {"name": "chat", "limits": {"rate_qps": 1000}},
                                     {"name": "tight", "limits": {"rate_qps": 0.2}}]}]})
        yield sims, gateway, repos
        gateway.stop()
    finally:
        for s in sims:
            s.stop()


@pytest.fixture
def client(fleet):
    _, gateway, _ = fleet
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def test_adapters_are_listed_with_their_parent_and_counted_under_their_own_name(fleet, client):
    sims, gateway, _ = fleet
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {BASE, "sql", "chat", "tight"}
    assert (cards["sql"].parent, cards["sql"].root, cards["chat"].parent) == (BASE, "sql", BASE)
    assert getattr(cards[BASE], "parent", None) is None
    assert wait_until(lambda: loaded_on(gateway, "sql") == 2, timeout=10, what="sql seen on two replicas")
    assert client.models.retrieve("tight").state == "loading"       # listed, none of the replicas has it
    before = metric(gateway.url, "cxygpt_gateway_requests_total", model="sql", code="200")
    assert ask(client, "sql", 3) == ["sql"] * 3
    assert metric(gateway.url, "cxygpt_gateway_requests_total", model="sql", code="200") == before + 3


def test_every_adapter_request_lands_on_a_replica_that_has_it_and_none_is_lost(fleet, client):
    sims, gateway, _ = fleet
    wait_until(lambda: loaded_on(gateway, "sql") == 2 and loaded_on(gateway, "chat") == 1, timeout=10,
               what="the adapters seen where they are loaded")
    failovers = metric(gateway.url, "cxygpt_gateway_failovers_total", model="sql")
    before = finished_all(sims)
    assert ask(client, "sql", 24) == ["sql"] * 24
    sql = settled(sims, before, 24)
    assert sql[2] == 0 and sql[0] + sql[1] == 24, sql             # never the replica without it
    assert metric(gateway.url, "cxygpt_gateway_failovers_total", model="sql") == failovers  # not even tried there
    before = finished_all(sims)
    assert ask(client, "chat", 12) == ["chat"] * 12
    assert settled(sims, before, 12) == [0, 12, 0]                  # only the replica that has it
    # all three names at once, mixed: none lost (a replica without the adapter would answer 404)
    before = finished_all(sims)
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda m: ask(client, m, 12, workers=4), (BASE, "sql", "chat")))
    assert answers == [[BASE] * 12, ["sql"] * 12, ["chat"] * 12]
    assert sum(settled(sims, before, 36)) == 36


def test_an_adapter_loaded_at_runtime_takes_requests_there_and_an_unloaded_one_stops(fleet, client):
    sims, gateway, repos = fleet
    engine = [openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0) for s in sims]
    engine[2].post("/load_lora_adapter", body={"lora_name": "chat", "lora_path": str(repos["chat"])}, cast_to=str)
    try:
        wait_until(lambda: loaded_on(gateway, "chat") == 2, timeout=10, what="chat seen on the third replica")
        before = finished_all(sims)
        # more at once than the second replica's 2 slots: the third one, which has it now, takes some
        assert ask(client, "chat", 24, max_tokens=30, workers=6) == ["chat"] * 24
        chat = settled(sims, before, 24)
        assert chat[0] == 0 and chat[2] > 0, chat
        engine[1].post("/unload_lora_adapter", body={"lora_name": "chat"}, cast_to=str)
        # at once, before the gateway has read the second replica's /v1/models again: none is lost (a 404 from an
        # engine without it sends the request to the next replica that has it)
        before = finished_all(sims)
        assert ask(client, "chat", 12) == ["chat"] * 12
        chat = settled(sims, before, 12)
        assert chat[0] == 0 and chat[2] == 12 - chat[1]
        wait_until(lambda: loaded_on(gateway, "chat") == 1, timeout=10, what="chat gone from the second replica")
        before = finished_all(sims)
        assert ask(client, "chat", 12) == ["chat"] * 12
        assert settled(sims, before, 12) == [0, 0, 12]
    finally:  # as the fixture made them: chat on the second replica only
        for at, wanted in ((1, True), (2, False)):
            has = "chat" in {m.id for m in engine[at].models.list().data}
            if wanted and not has:
                engine[at].post("/load_lora_adapter", body={"lora_name": "chat", "lora_path": str(repos["chat"])},
                                cast_to=str)
            elif has and not wanted:
                engine[at].post("/unload_lora_adapter", body={"lora_name": "chat"}, cast_to=str)
        for c in engine:
            c.close()


def test_an_adapter_no_replica_has_is_a_503_after_a_short_wait_never_a_404(fleet, client):
    _, gateway, _ = fleet
    wait_until(lambda: loaded_on(gateway, "tight") == 0, timeout=10, what="every replica read: none has tight")
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="tight", messages=MESSAGES, max_tokens=4)
    assert e.value.status_code == 503 and e.value.response.headers["retry-after"] == "5"
    assert e.value.body["code"] == "adapter_not_loaded" and "not loaded on any ready replica" in e.value.body["message"]


def test_each_adapter_has_its_own_rate_budget(fleet, client, tmp_path):
    _, gateway, repos = fleet
    # tight: 0.2 requests/s of its own (2 per 10 s), spent by the 503 above and these (each admitted one waits
    # adapter_wait_s, 2 s, for a replica that has it, then 503)
    codes = []
    while len(codes) < 3 and 429 not in codes:
        try:
            client.chat.completions.create(model="tight", messages=MESSAGES, max_tokens=4)
            codes.append(200)
        except openai.APIStatusError as e:
            codes.append(e.status_code)
    assert codes[-1] == 429 and set(codes) <= {503, 429}, codes
    # the base and the other adapters still serve
    assert ask(client, BASE, 2) == [BASE] * 2 and ask(client, "sql", 2) == ["sql"] * 2
    assert metric(gateway.url, "cxygpt_gateway_requests_total", model="tight", code="429") >= 1
