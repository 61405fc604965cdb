"""LoRA adapters in the gateway (pure): routing only to replicas that have the adapter loaded, where it is active
first, within the load bound and the prefix order; the queue's line; the engines' pages read; the registry's adapter
routes (limits, clashes, the count bound, a removal that drains); discovery's adapters."""
import asyncio
import logging

import pytest

from cxygpt_gateway.admission.queue import Backend, ModelQueue
from cxygpt_gateway.discovery.base import AdapterSpec, ModelSpec, Unavailable
from cxygpt_gateway.discovery.kubernetes import adapters_of, desired_routes
from cxygpt_gateway.discovery.static import spec_from_config
from cxygpt_gateway.routing.keys import RouteKey, for_adapter, route_key
from cxygpt_gateway.routing.policies import AFFINITY, SPILL, Router, Routing, adapter_rank, order, serves
from cxygpt_gateway.routing.registry import AdapterRoute, Registry
from cxygpt_gateway.settings import ModelConfig
from cxygpt_gateway.upstream.engine_metrics import EngineLoad, engine_load, loaded_adapters
from cxygpt_profiles import default_table

PREFIX = Routing("prefix", 0.25)
LEAST = Routing("least-load")
ROUND = Routing("round-robin")


def replicas(n, loaded=None, max_lora=2):
    """`loaded`: each replica's adapters (None: never read)."""
    out = [Backend(f"http://10.0.0.{i}:8000") for i in range(n)]
    for i, b in enumerate(out):
        b.adapters = None if loaded is None else frozenset(loaded[i])
        b.max_lora = max_lora
    return out


def urls(rs):
    return [r.url[-6] for r in rs]  # the replica's number


# ---- routing (pure) -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("routing", [PREFIX, LEAST, ROUND])
def test_an_adapters_request_goes_only_to_replicas_that_have_it_loaded(routing):
    rs = replicas(4, loaded=[{"sql"}, set(), {"sql", "chat"}, {"chat"}])
    router = Router(routing, [r.url for r in rs])
    for home in range(0, 1 << 64, 1 << 58):
        key = RouteKey(home) if routing is PREFIX else None
        assert set(urls(order(routing, rs, key, adapter="sql"))) == {"0", "2"}
        picked, _ = router.pick(key, rs, limit=8, adapter="sql")
        assert picked is not None and "sql" in picked.adapters
        assert router.pick(key, rs, limit=8, adapter="absent") == (None, "")
    # the base model goes anywhere; a replica whose adapters were never read may have it
    assert len(order(routing, rs, RouteKey(1) if routing is PREFIX else None)) == 4
    assert serves(replicas(1)[0], "sql")


def test_a_replica_where_the_adapter_is_active_comes_first_then_one_with_a_free_adapter_slot():
    rs = replicas(3, loaded=[{"a", "b", "c"}] * 3)
    rs[0].lora_active = frozenset({"b", "c"})       # both slots taken by others: the request would wait there
    rs[1].lora_active = frozenset({"b"})            # a free slot
    rs[2].own_adapters = {"a": 1}                   # this gateway's request of it is in flight there: active
    assert [adapter_rank(r, "a") for r in rs] == [2, 1, 0]
    for home in range(0, 1 << 64, 1 << 59):        # wherever its home is
        assert urls(order(PREFIX, rs, RouteKey(home), adapter="a")) == ["2", "1", "0"]
    rs[2].own_adapters = {}
    rs[0].max_lora = 0                              # max_lora unknown: counted as free
    assert adapter_rank(rs[0], "a") == 1


def test_among_equal_replicas_the_prefix_order_holds_and_only_where_it_is_active_the_bound_does_not():
    rs = replicas(4, loaded=[{"a"}] * 4)
    ring_order = urls(order(PREFIX, rs, RouteKey(12345)))
    assert urls(order(PREFIX, rs, RouteKey(12345), adapter="a")) == ring_order  # nobody active: the ring's
    active = rs[int(ring_order[2])]
    active.lora_active = frozenset({"a"})
    ranked = urls(order(PREFIX, rs, RouteKey(12345), adapter="a"))
    assert ranked[0] == ring_order[2] and ranked[1:] == [u for u in ring_order if u != ring_order[2]]
    # above the load bound (⌈1.25 × 9 / 4⌉ = 3) where it is active: still first (its slots bound it, in pick)
    active.outstanding = 5
    for r in rs:
        if r is not active:
            r.outstanding = 1
    assert urls(order(PREFIX, rs, RouteKey(12345), adapter="a"))[0] == ring_order[2]
    # one with a free adapter slot above the bound: after those within it
    spare = rs[int(ring_order[0])]
    active.outstanding, spare.outstanding = 1, 5
    ranked = urls(order(PREFIX, rs, RouteKey(12345), adapter="a"))
    assert ranked[0] == ring_order[2] and ranked[-1] == ring_order[0]


def test_the_first_choice_for_an_adapter_is_its_active_replica_and_a_spill_is_said():
    rs = replicas(2, loaded=[{"a"}, {"a"}])
    router = Router(PREFIX, [r.url for r in rs])
    key = RouteKey(777)
    home = order(PREFIX, rs, key)[0]
    other = next(r for r in rs if r is not home)
    other.lora_active = frozenset({"a"})
    assert router.pick(key, rs, limit=2, adapter="a") == (other, AFFINITY)
    other.outstanding = 2 + 0  # full (its extra places: ⌊0.25 × 2⌋ = 0)
    assert router.pick(key, rs, limit=2, adapter="a") == (home, SPILL)


def test_a_full_active_replica_is_waited_for_rather_than_one_whose_adapter_slots_others_hold():
    rs = replicas(3, loaded=[{"a", "b", "c", "d"}] * 3)
    rs[0].lora_active = frozenset({"a"})            # active, full (its slots and the first choice's ⌊ε × 4⌋ more)
    rs[0].outstanding = 5
    rs[1].lora_active = frozenset({"b", "c"})       # free engine slots, but both adapter slots held by others
    rs[2].lora_active = frozenset({"c", "d"})
    router = Router(PREFIX, [r.url for r in rs])
    assert router.pick(RouteKey(5), rs, limit=4, adapter="a") == (None, "")  # it waits in the queue
    rs[2].lora_active = frozenset({"c"})            # a free adapter slot: it may run there at once
    assert router.pick(RouteKey(5), rs, limit=4, adapter="a") == (rs[2], SPILL)
    # active nowhere and no free adapter slot anywhere: it goes where it can, and waits there
    rs[0].lora_active, rs[2].lora_active = frozenset({"b", "d"}), frozenset({"c", "d"})
    assert router.pick(RouteKey(5), rs, limit=4, adapter="a")[0] in rs[1:]
    # a failover takes any replica but the one that failed
    rs[0].lora_active, rs[0].outstanding = frozenset({"a"}), 0
    assert router.pick(RouteKey(5), rs, limit=4, exclude=(rs[0],), adapter="a")[0] in rs[1:]


def test_an_adapters_key_is_its_own_and_alike_in_every_gateway():
    body = {"model": "sql", "messages": [{"role": "user", "content": "x" * 3000}]}
    base = route_key("chat", body, None)
    sql = for_adapter(base, "sql")
    assert sql == for_adapter(base, "sql") and sql.home != base.home and sql.home != for_adapter(base, "chat").home
    assert len(sql.chain) == len(base.chain) and not set(sql.chain) & set(base.chain)
    assert for_adapter(RouteKey(1), "sql").home == for_adapter(RouteKey(1), "sql").home


# ---- the queue ------------------------------------------------------------------------------------------------

async def test_a_waiter_for_a_full_adapter_replica_holds_up_nobody_and_gets_the_next_slot_there():
    q = ModelQueue(queue_size=10, max_concurrency=1)
    q.set_backends(["http://a", "http://b"])
    q.backends["http://a"].adapters = frozenset({"sql"})
    q.backends["http://b"].adapters = frozenset()
    on_a = q.try_take(adapter="sql")
    assert on_a is not None and on_a.backend.url == "http://a"
    assert q.backends["http://a"].own_adapters == {"sql": 1} and q.adapter_requests("sql") == 1
    sql_waits = asyncio.ensure_future(q.wait(adapter="sql"))        # a is full: it waits, first in line
    await asyncio.sleep(0)
    base = await asyncio.wait_for(q.wait(), 1)                      # behind it, but b is free: it goes
    assert base.backend.url == "http://b" and not sql_waits.done() and q.adapter_requests("sql") == 2
    base.release()
    await asyncio.sleep(0)
    assert not sql_waits.done()                                     # a slot on b is no use to it
    on_a.release()
    slot = await asyncio.wait_for(sql_waits, 1)
    assert slot.backend.url == "http://a" and slot.adapter == "sql" and q.waiting == 0
    slot.release()
    assert q.backends["http://a"].own_adapters == {} and q.adapter_requests("sql") == 0


async def test_a_waiter_for_an_adapter_goes_as_soon_as_a_replica_has_it_loaded():
    q = ModelQueue(queue_size=10, max_concurrency=4)
    q.set_backends(["http://a", "http://b"])
    for b in q.backends.values():
        b.adapters = frozenset()
    assert q.try_take(adapter="new") is None and q.serving("new") == []
    q.backends["http://a"].adapters = None                          # never read: it may have it
    assert q.serving("new") == [q.backends["http://a"]]
    q.backends["http://a"].adapters = frozenset()
    waiting = asyncio.ensure_future(q.wait(adapter="new"))
    await asyncio.sleep(0)
    assert not waiting.done()
    q.backends["http://b"].adapters = frozenset({"new"})           # what the next read of b's /v1/models says
    q.dispatch()
    assert (await asyncio.wait_for(waiting, 1)).backend.url == "http://b"


async def test_a_failover_of_an_adapters_request_keeps_to_its_replicas():
    q = ModelQueue(queue_size=10, max_concurrency=4)
    q.set_backends(["http://a", "http://b", "http://c"])
    for url, loaded in (("http://a", {"sql"}), ("http://b", set()), ("http://c", {"sql"})):
        q.backends[url].adapters = frozenset(loaded)
    first = q.try_take(adapter="sql")
    other = q.take_other((first.backend,), adapter="sql")
    assert other is not None and other.backend.url in {"http://a", "http://c"} - {first.backend.url}
    assert q.take_other((first.backend, other.backend), adapter="sql") is None


# ---- what the engines say -------------------------------------------------------------------------------------

LORA_PAGE = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="qwen3-0.6b"} 3.0
vllm:num_requests_waiting{engine="0",model_name="qwen3-0.6b"} 1.0
# HELP vllm:lora_requests_info Running stats on lora requests.
# TYPE vllm:lora_requests_info gauge
vllm:lora_requests_info{max_lora="2",running_lora_adapters="sql",waiting_lora_adapters=""} 1.7650001e+09
vllm:lora_requests_info{max_lora="2",running_lora_adapters="sql,support",waiting_lora_adapters="chat"} 1.7650003e+09
vllm:lora_requests_info{max_lora="2",running_lora_adapters="",waiting_lora_adapters=""} 1.7650002e+09
"""


def test_the_newest_lora_series_says_which_adapters_are_active_and_the_batch_limit():
    assert engine_load(LORA_PAGE) == EngineLoad(3, 1, 0.0, frozenset({"sql", "support", "chat"}), 2)
    no_lora = "\n".join(line for line in LORA_PAGE.splitlines() if "lora" not in line)
    assert engine_load(no_lora) == EngineLoad(3, 1, 0.0, frozenset(), 0)


def test_a_replicas_loaded_adapters_are_its_model_cards_with_a_parent():
    answer = (b'{"object": "list", "data": [{"id": "qwen3-0.6b", "root": "Qwen/Qwen3-0.6B", "parent": null},'
              b'{"id": "sql", "root": "cxygpt-demo/sql", "parent": "qwen3-0.6b"}, {"id": 7, "parent": "x"}]}')
    assert loaded_adapters(answer) == frozenset({"sql"})
    assert loaded_adapters(b'{"object": "list", "data": []}') == frozenset()
    for bad in (b"<html>", b"[]", b'{"data": 3}'):
        assert loaded_adapters(bad) is None


# ---- the registry ---------------------------------------------------------------------------------------------

def base_spec(name="qwen", adapters=("sql", "chat"), urls=("http://a", "http://b"), **limits):
    table = default_table()
    lim = table.get("DEV_32G").limits
    return ModelSpec(name=name, urls=urls, limits=lim.model_copy(update=limits) if limits else lim, mode="multi",
                     profile="DEV_32G", adapters=tuple(a if isinstance(a, AdapterSpec) else AdapterSpec(a)
                                                       for a in adapters))


def test_an_adapter_is_a_model_of_its_own_on_its_bases_queue():
    registry = Registry(default_table())
    own = default_table().get("DEV_32G").limits.model_copy(update={"rate_qps": 0.5})
    registry.upsert(base_spec(adapters=("sql", AdapterSpec("chat", source="hf://org/chat@v1", limits=own))))
    base, sql, chat = (registry.get(n) for n in ("qwen", "sql", "chat"))
    assert isinstance(sql, AdapterRoute) and sql.parent == "qwen" and sql.adapter == "sql"
    assert sql.queue is base.queue and sql.demand is base.demand and sql.degrade is base.degrade
    assert sql.spec.served_name == "sql" and sql.tokenizer_name == "qwen" and sql.spec.urls == base.spec.urls
    assert sql.scope.key == "model:sql" and sql.limits == base.limits        # the base's limits, its own budgets
    assert chat.limits.rate_qps == 0.5 and chat.source == "hf://org/chat@v1"
    assert list(registry.routes) == ["qwen"]                                 # per-model gauges: the base's only
    base.queue.backends["http://a"].adapters = frozenset({"sql"})
    base.queue.backends["http://b"].adapters = frozenset()
    assert (sql.state(), chat.state()) == ("ready", "loading")


def test_a_name_another_model_serves_stays_that_models_and_is_logged_once(caplog):
    registry = Registry(default_table())
    caplog.set_level(logging.WARNING, "cxygpt.gateway")
    registry.upsert(base_spec("zeta", adapters=("sql", "other")))
    assert registry.get("sql").parent == "zeta"
    registry.upsert(base_spec("alpha", adapters=("sql",)))                   # listed by two: the first name wins
    registry.upsert(base_spec("other", adapters=()))                         # a model of an adapter's name
    registry.upsert(base_spec("other", adapters=()))                         # (discovery repeats itself)
    assert registry.get("sql").parent == "alpha" and not isinstance(registry.get("other"), AdapterRoute)
    refusals = [r.getMessage() for r in caplog.records]
    assert len(refusals) == 2 and sorted(refusals) == sorted([
        "adapter sql of model zeta is not served: model alpha lists it too (the first name wins)",
        "adapter other of model zeta is not served: a model of that name is"])
    registry.remove("other")                                                 # the model goes: the adapter is back
    assert registry.get("other").parent == "zeta"


def test_a_model_serves_at_most_max_adapters(caplog):
    registry = Registry(default_table(), max_adapters=2)
    registry.upsert(base_spec(adapters=("a", "b", "c", "d")))
    assert sorted(registry.adapters) == ["a", "b"]
    assert sum("max_adapters_per_model (2)" in r.getMessage() for r in caplog.records) == 2


async def test_a_removed_adapter_is_503_while_its_requests_run_then_unknown():
    registry = Registry(default_table())
    registry.upsert(base_spec(adapters=("sql", "chat")))
    queue = registry.get("sql").queue
    slot = queue.try_take(adapter="sql")
    registry.upsert(base_spec(adapters=("chat",)))                          # discovery no longer lists it
    assert registry.get("sql") is None
    busy = registry.removed_adapter("sql")
    assert busy is not None and busy.status == 503 and busy.headers["Retry-After"] == "1"
    assert "1 requests in flight" in busy.message
    slot.release()                                                          # its last request ends
    assert registry.removed_adapter("sql") is None and registry.draining == {}
    registry.upsert(base_spec(adapters=("chat",)))
    assert registry.removed_adapter("chat") is None                        # never removed: nothing to say


# ---- discovery ------------------------------------------------------------------------------------------------

def test_static_adapters_are_names_or_names_with_limits():
    cfg = ModelConfig(name="qwen", url="http://a", profile="DEV_32G",
                      adapters=["sql", {"name": "chat", "limits": {"rateQps": 0.5}}])
    spec = spec_from_config(cfg, default_table())
    assert [a.name for a in spec.adapters] == ["sql", "chat"]
    assert spec.adapters[0].limits is None and spec.adapters[1].limits.rate_qps == 0.5
    with pytest.raises(ValueError, match="adapter names must be unique"):
        spec_from_config(ModelConfig(name="q", url="http://a", profile="DEV_32G", adapters=["x", "x"]),
                         default_table())


def test_kubernetes_adapters_and_a_model_with_no_route_yet_reserves_their_names():
    spec = {"model": {"name": "qwen"}, "adapters": [{"name": "sql", "source": "hf://org/sql@main"}, {"source": "x"},
                                                     "junk", {"name": "sql"}, {"name": "chat"}]}
    assert adapters_of(spec) == (AdapterSpec("sql", "hf://org/sql@main"), AdapterSpec("chat"))
    md = {"metadata": {"namespace": "ns", "name": "qwen", "uid": "1", "creationTimestamp": "2026-01-01T00:00:00Z"},
          "spec": spec}
    routes = desired_routes({("ns", "qwen"): md}, {})
    assert set(routes) == {"qwen", "sql", "chat"}
    assert all(isinstance(r, Unavailable) for r in routes.values()) and "adapter sql of model qwen" in \
        routes["sql"].message
