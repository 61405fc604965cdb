"""Gateway admission logic, pure, on a fake clock: auth, body checks, rate limits, queue, degradation, policy."""
from __future__ import annotations

import asyncio
import hashlib

import orjson
import pytest

from cxygpt_gateway.admission.auth import KeysFile, KeyStore
from cxygpt_gateway.admission.degrade import MAX_SAMPLES, DegradeMonitor
from cxygpt_gateway.admission.policy import effective
from cxygpt_gateway.admission.queue import ModelQueue
from cxygpt_gateway.admission.ratelimit import LocalWindows, Rate, RateLimiter, Scope, Window, request_window
from cxygpt_gateway.admission.request import cannot_exceed, decode, echo, estimate_tokens, token_id_count, validate
from cxygpt_gateway.discovery.static import spec_from_config
from cxygpt_gateway.errors import GatewayError
from cxygpt_gateway.settings import ModelConfig
from cxygpt_gateway.upstream.relay import scan_stream
from cxygpt_profiles import default_table
from cxygpt_profiles.table import DegradeThresholds


async def take(queue, priority=0, key=None):
    """A slot now, or after waiting in line, as admission takes one."""
    return queue.try_take(key) or await queue.wait(priority, key)


class FakeClock:
    def __init__(self, start: float = 1_000_000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# ---- auth -------------------------------------------------------------------------------------------------

def keystore(allow_anonymous=False) -> KeyStore:
    return KeyStore(KeysFile.model_validate({
        "allow_anonymous": allow_anonymous,
        "tiers": {"gold": {"rate_qps": 10, "priority": 0}, "free": {"rate_qps": 1, "priority": 5}},
        "keys": [{"id": "team-a", "key_sha256": hashlib.sha256(b"sk-a").hexdigest(), "tier": "gold"}]}))


def test_auth_maps_keys_to_tiers_and_refuses_others():
    keys = keystore()
    caller = keys.authenticate("Bearer sk-a")
    assert (caller.key_id, caller.tier_name, caller.tier.rate_qps) == ("team-a", "gold", 10)
    for header in (None, "Bearer sk-wrong", "Basic sk-a", "Bearer "):
        with pytest.raises(GatewayError) as e:
            keys.authenticate(header)
        assert e.value.status == 401 and e.value.code == "invalid_api_key"


def test_anonymous_only_when_allowed_and_everyone_without_a_keys_file():
    assert keystore(allow_anonymous=True).authenticate(None).key_id == "anonymous"
    open_door = KeyStore(None)
    assert open_door.authenticate(None).key_id == "anonymous"
    assert open_door.authenticate("Bearer anything").key_id == "anonymous"
    assert open_door.authenticate("Bearer ").key_id == "anonymous"  # chat UIs send an empty token
    assert open_door.authenticate("Basic xyz").key_id == "anonymous"


def test_keys_file_names_unknown_tiers():
    with pytest.raises(ValueError, match="unknown tier"):
        KeysFile.model_validate({"keys": [{"id": "x", "key_sha256": "a" * 64, "tier": "nope"}]})


# ---- body -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, param", [
    (b"{not json", None), (b"[1]", None),
    (b'{"model": "m", "messages": []}', "messages"),
    (b'{"model": "m", "messages": [{"content": "x"}]}', "messages[0]"),
    (b'{"model": "m", "messages": [{"role": "user"}], "max_tokens": 0}', "max_tokens"),
    (b'{"model": "m", "messages": [{"role": "user"}], "max_tokens": true}', "max_tokens"),
    (b'{"model": "m", "messages": [{"role": "user"}], "stream": "yes"}', "stream"),
    (b'{"model": "m", "messages": [{"role": "user"}], "stream_options": {"include_usage": 1}}', "stream_options"),
])
def test_bad_bodies_get_a_precise_400(raw, param):
    with pytest.raises(GatewayError) as e:
        check(decode(raw), "chat", len(raw))
    assert e.value.status == 400 and e.value.param == param


def check(body: dict, kind: str, size: int, max_n: int = 8, max_batch: int = 64):
    return validate(body, kind, size, max_n=max_n, max_batch=max_batch)


def test_choices_and_batches_are_bounded_per_model_with_the_limit_named():
    with pytest.raises(GatewayError) as e:
        check({"model": "m", "messages": [{"role": "user"}], "n": 10000}, "chat", 10, max_n=8)
    assert e.value.status == 400 and e.value.param == "n" and "10000" in e.value.message and "8" in e.value.message
    assert check({"model": "m", "messages": [{"role": "user"}], "n": 8}, "chat", 10, max_n=8).n == 8
    with pytest.raises(GatewayError):
        check({"model": "m", "messages": [{"role": "user"}], "n": 0}, "chat", 10)
    prompts = ["a"] * 25000
    with pytest.raises(GatewayError) as e:
        check({"model": "m", "prompt": prompts}, "completions", 10, max_batch=64)
    assert (e.value.status, e.value.param, e.value.code) == (400, "prompt", "batch_too_large")
    assert "25000 prompts" in e.value.message and "64" in e.value.message
    with pytest.raises(GatewayError):
        check({"model": "m", "input": [[1, 2]] * 65}, "embeddings", 10, max_batch=64)
    req = check({"model": "m", "prompt": ["a"] * 64, "n": 2}, "completions", 10, max_batch=64)
    assert (req.prompts, req.n) == (64, 2)
    assert check({"model": "m", "prompt": [1, 2, 3]}, "completions", 10).prompts == 1  # one prompt of ids


def test_a_client_string_is_echoed_cut_with_its_length():
    assert echo("qwen3") == "'qwen3'"
    long = "x" * 1_000_000
    shown = echo(long)
    assert len(shown) < 120 and "1000000 characters" in shown


def test_prompts_and_token_counting_shortcuts():
    raw = orjson.dumps({"model": "m", "prompt": [1, 2, 3, 4]})
    req = check(decode(raw), "completions", len(raw))
    assert token_id_count(req) == 4
    raw = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * 400}]})
    req = check(decode(raw), "chat", len(raw))
    assert token_id_count(req) is None
    assert cannot_exceed(req, 1000, template_margin=128)          # 450 bytes + 128 ≤ 1000
    assert not cannot_exceed(req, 500, template_margin=128)       # might be over: ask the upstream
    assert estimate_tokens(req) == 100 + 4
    with pytest.raises(GatewayError):
        check(decode(b'{"model": "m", "prompt": [1, "a"]}'), "completions", 10)


# ---- rate limits --------------------------------------------------------------------------------------------

async def test_qps_limit_per_scope_with_retry_after_from_the_window(clock):
    limiter = RateLimiter(LocalWindows(clock))
    model = Scope("model:m", "model m", Rate(qps=2))
    key_a, key_b = (Scope(f"key:{k}", f"key {k}", Rate(qps=1)) for k in "ab")
    await limiter.admit([model, key_a])
    with pytest.raises(GatewayError) as e:  # key a's own limit
        await limiter.admit([model, key_a])
    assert e.value.status == 429 and "key a" in e.value.message and e.value.headers["Retry-After"] == "1"
    await limiter.admit([model, key_b])
    with pytest.raises(GatewayError) as e:  # the model's global limit, whoever asks
        await limiter.admit([model, Scope("key:c", "key c", Rate())])
    assert "model m" in e.value.message
    clock.advance(1.01)
    await limiter.admit([model, key_a])


async def test_rejected_requests_cost_nothing(clock):
    limiter = RateLimiter(LocalWindows(clock))
    scope = Scope("key:a", "key a", Rate(qps=1))
    await limiter.admit([scope])
    for _ in range(5):
        with pytest.raises(GatewayError):
            await limiter.admit([scope])
    clock.advance(1.01)
    await limiter.admit([scope])


async def test_tokens_settle_after_the_response_and_block_until_the_minute_turns(clock):
    limiter = RateLimiter(LocalWindows(clock))
    scope = Scope("model:m", "model m", Rate(tpm=1000))
    await limiter.admit([scope])
    held = await limiter.reserve([scope], 900)
    await limiter.settle(held, 1500)  # more than it reserved (its input was under-counted) is paid in full
    clock.advance(20)
    with pytest.raises(GatewayError) as e:  # the budget is spent: even a small request waits for the next minute
        await limiter.reserve([scope], 10)
    assert "1000 tokens per minute" in e.value.message
    assert int(e.value.headers["Retry-After"]) == 40
    clock.advance(41)
    await limiter.reserve([scope], 10)


async def test_concurrent_requests_cannot_slip_past_the_token_budget_together(clock):
    limiter = RateLimiter(LocalWindows(clock))
    scope = Scope("key:a", "key a", Rate(tpm=1000))
    first = await limiter.reserve([scope], 600)  # both pass "is any budget left?": only one may hold 600
    await limiter.admit([scope])
    with pytest.raises(GatewayError) as e:
        await limiter.reserve([scope], 600)
    assert e.value.status == 429 and "may use 600" in e.value.message and "Retry-After" in e.value.headers
    await limiter.settle(first, 100)  # it used 100: 500 come back
    second = await limiter.reserve([scope], 600)
    await limiter.settle(second, None)  # cut off, usage unknown: the reservation stands
    with pytest.raises(GatewayError):
        await limiter.reserve([scope], 400)


async def test_one_request_over_the_whole_budget_is_told_to_ask_for_less(clock):
    limiter = RateLimiter(LocalWindows(clock))
    scope = Scope("key:a", "key a", Rate(tpm=1000))
    with pytest.raises(GatewayError) as e:
        await limiter.reserve([scope], 10_000 * 256)  # n=10000 x max_tokens 256
    assert (e.value.status, e.value.code) == (429, "tokens_exceed_limit") and "lower max_tokens or n" in e.value.message
    await limiter.reserve([scope], 1000)  # nothing was held by the refusal


async def test_a_refusal_by_one_budget_gives_back_what_the_others_held(clock):
    limiter = RateLimiter(LocalWindows(clock))
    model, key = Scope("model:m", "model m", Rate(tpm=10_000)), Scope("key:a", "key a", Rate(tpm=1000))
    await limiter.reserve([model, key], 1000)
    for _ in range(20):
        with pytest.raises(GatewayError):
            await limiter.reserve([model, key], 500)  # the key is spent; the model's budget must not leak
    other_key = Scope("key:b", "key b", Rate(tpm=10_000))
    await limiter.reserve([model, other_key], 9000)


async def test_unused_tokens_come_back_only_to_the_window_they_came_from(clock):
    limiter = RateLimiter(LocalWindows(clock))
    scope = Scope("key:a", "key a", Rate(tpm=1000))
    held = await limiter.reserve([scope], 800)
    clock.advance(61)  # a new minute
    await limiter.reserve([scope], 900)
    await limiter.settle(held, 0)  # its 800 were in the last minute: none come back to this one
    with pytest.raises(GatewayError):
        await limiter.reserve([scope], 200)


async def test_fractional_qps_keeps_its_rate(clock):
    assert request_window(2.5) == Window(25, 10)
    limiter = RateLimiter(LocalWindows(clock))
    scope = Scope("key:a", "key a", Rate(qps=0.5))  # 5 per 10 s
    for _ in range(5):
        await limiter.admit([scope])
    with pytest.raises(GatewayError) as e:
        await limiter.admit([scope])
    assert e.value.headers["Retry-After"] == "10"


async def test_storage_failure_fails_open_and_is_counted(clock):
    class Flaky(LocalWindows):
        down = True

        async def requests_free(self, key, w):
            if self.down:
                raise ConnectionError("redis down")
            return await super().requests_free(key, w)

    failures = []
    windows = Flaky(clock)
    limiter = RateLimiter(windows, clock=clock, on_storage_error=lambda: failures.append(1))
    scope = Scope("key:a", "key a", Rate(qps=1))
    await limiter.admit([scope])
    assert failures == [1]
    windows.down = False  # back, but not asked again for a while
    await limiter.admit([scope])
    await limiter.admit([scope])
    assert failures == [1, 1, 1]
    clock.advance(2)
    await limiter.admit([scope])
    with pytest.raises(GatewayError):
        await limiter.admit([scope])
    assert len(failures) == 3


# ---- queue --------------------------------------------------------------------------------------------------

async def test_least_outstanding_backend_and_concurrency_cap(clock):
    q = ModelQueue(queue_size=0, max_concurrency=2, clock=clock)
    q.set_backends(["http://a", "http://b"])
    slots = [await take(q) for _ in range(4)]
    assert sorted(s.backend.url for s in slots) == ["http://a", "http://a", "http://b", "http://b"]
    with pytest.raises(GatewayError) as e:  # no room to wait: fail at once
        await take(q)
    assert e.value.status == 503 and e.value.code == "queue_full" and "Retry-After" in e.value.headers
    slots[0].release()
    slots[0].release()  # idempotent
    assert (await take(q)).backend is slots[0].backend


async def test_waiters_are_served_fifo_within_priority_and_handed_slots_directly(clock):
    q = ModelQueue(queue_size=3, max_concurrency=1, clock=clock)
    q.set_backends(["http://a"])
    held = await take(q)
    order = []

    async def wait(name, priority):
        slot = await take(q, priority)
        order.append(name)
        return slot

    tasks = [asyncio.create_task(wait(n, p)) for n, p in (("low-1", 5), ("low-2", 5), ("high", 0))]
    await asyncio.sleep(0)
    assert q.waiting == 3
    with pytest.raises(GatewayError):  # line full
        await take(q)
    clock.advance(2)
    held.release()
    first = await tasks[2]
    assert order == ["high"] and first.queued_s == 2
    first.release()
    (await tasks[0]).release()
    (await tasks[1]).release()
    assert order == ["high", "low-1", "low-2"] and q.waiting == 0 and q.in_flight == 0


async def test_a_cancelled_wait_leaves_the_line(clock):
    q = ModelQueue(queue_size=1, max_concurrency=1, clock=clock)
    q.set_backends(["http://a"])
    held = await take(q)
    waiter = asyncio.create_task(take(q))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert q.waiting == 0
    held.release()
    assert q.in_flight == 0
    held = await take(q)
    with pytest.raises(TimeoutError):  # the caller bounds the wait; timing out is a cancellation too
        async with asyncio.timeout(0):
            await take(q)
    assert q.waiting == 0


async def test_a_slot_freed_between_a_waits_cancel_and_its_wake_up_goes_to_the_next_in_line(clock):
    """A queue timeout or a client leaving cancels the waiter's future at once, but its own accounting runs only
    when its task next runs; a slot freed in between must neither fail nor leak (it did: 503s for everyone)."""
    q = ModelQueue(queue_size=4, max_concurrency=1, clock=clock)
    q.set_backends(["http://a"])
    held = await take(q)
    first, second = asyncio.create_task(take(q)), asyncio.create_task(take(q))
    await asyncio.sleep(0)
    first.cancel()  # its future is cancelled now, its except block has not run yet
    held.release()
    with pytest.raises(asyncio.CancelledError):
        await first
    slot = await second
    assert (q.waiting, q.in_flight) == (0, 1)
    slot.release()
    assert (q.waiting, q.in_flight) == (0, 0)


async def test_no_routable_backend_is_503(clock):
    q = ModelQueue(queue_size=4, max_concurrency=1, clock=clock)
    q.set_backends(["http://a"])
    q.backends["http://a"].healthy = False
    with pytest.raises(GatewayError) as e:
        await take(q)
    assert e.value.code == "no_ready_replica"


async def test_a_replica_that_turns_healthy_again_serves_those_waiting_at_once(clock):
    q = ModelQueue(queue_size=4, max_concurrency=1, clock=clock)
    q.set_backends(["http://a"])
    busy = await take(q)
    waiting = asyncio.ensure_future(take(q))
    await asyncio.sleep(0)
    q.mark(q.backends["http://a"], False)  # it failed: the slot in flight ends, nobody is handed a sick replica
    busy.release()
    await asyncio.sleep(0)
    assert not waiting.done() and q.waiting == 1
    q.mark(q.backends["http://a"], True)  # back (health check): the line moves without any release
    slot = await asyncio.wait_for(waiting, 1)
    assert slot.backend.url == "http://a" and q.waiting == 0
    slot.release()


async def test_a_new_replica_serves_those_waiting_at_once(clock):
    q = ModelQueue(queue_size=4, max_concurrency=1, clock=clock)
    q.set_backends(["http://a"])
    busy = await take(q)
    waiting = asyncio.ensure_future(take(q))
    await asyncio.sleep(0)
    q.set_backends(["http://a", "http://b"])  # a scale-up: discovery reports a second ready endpoint
    assert (await asyncio.wait_for(waiting, 1)).backend.url == "http://b"
    busy.release()


async def test_failover_takes_another_free_replica_ahead_of_the_line_and_only_a_free_one(clock):
    q = ModelQueue(queue_size=4, max_concurrency=1, clock=clock)
    q.set_backends(["http://a", "http://b"])
    first = await take(q)
    tried = (first.backend,)
    other = q.take_other(tried, queued_s=0.5)
    assert other.backend.url != first.backend.url and other.queued_s == 0.5
    first.release(served=False)
    assert q.service_s_ewma == 1.0  # a replica that never got the request says nothing of the service time
    assert q.take_other((other.backend,)) is not None  # a is free again
    assert q.take_other((q.backends["http://a"], q.backends["http://b"])) is None


# ---- degradation --------------------------------------------------------------------------------------------

def monitor(clock, changes):
    thresholds = DegradeThresholds(p95_ttft_ms=1000, queue_depth=4, hold_s=10, recover_s=20)
    return DegradeMonitor(thresholds, window_s=5, clock=clock, on_change=lambda d, why: changes.append((d, why)))


def test_degrades_only_when_ttft_stays_high_for_the_hold_time(clock):
    changes = []
    m = monitor(clock, changes)
    for _ in range(10):
        m.observe_ttft(0.1)
    m.observe_ttft(3.0)
    assert m.update() is False  # one slow request in 11 is under the p95
    for step in range(11):
        for _ in range(5):
            m.observe_ttft(2.0)
        assert m.update() is (step == 10)
        clock.advance(1)
    assert changes[0][0] is True and "p95 TTFT" in changes[0][1]


def test_recovers_with_hysteresis(clock):
    changes = []
    m = monitor(clock, changes)
    m.observe_queue_depth(9)
    m.update()
    clock.advance(10)
    assert m.update() is True and "queue depth 9 > 4" in m.reason
    m.observe_queue_depth(4)  # at the threshold, not clearly below it: stays degraded
    clock.advance(30)
    assert m.update() is True
    m.observe_queue_depth(3)  # below 80 %
    m.update()
    clock.advance(19)
    assert m.update() is True
    clock.advance(1)
    assert m.update() is False and changes[-1][0] is False


def test_degrades_when_a_share_of_arrivals_is_shed_for_the_hold_time(clock):
    changes = []
    m = monitor(clock, changes)  # shed_share 0.25 by default
    for _ in range(19):
        m.observe_arrival(shed=True)
    assert m.shed_share() is None and m.update() is False  # too few arrivals to judge
    m.observe_arrival(shed=False)
    assert m.shed_share() == 0.95
    for _ in range(10):
        assert m.update() is False
        clock.advance(1)
        for _ in range(3):  # the window (5 s) keeps a steady mix: 3 shed, 1 served per second
            m.observe_arrival(shed=True)
        m.observe_arrival(shed=False)
    assert m.update() is True and "75% of arrivals shed for capacity > 25% for 10 s" in m.reason
    # degraded, the overload goes on: the share stays above 80 % of 25 %, so it stays degraded
    clock.advance(30)
    for _ in range(20):
        m.observe_arrival(shed=False)
    for _ in range(6):
        m.observe_arrival(shed=True)
    assert m.shed_share() == 6 / 26 and m.update() is True
    clock.advance(6)  # the window forgets them; fresh arrivals are all served
    for _ in range(20):
        m.observe_arrival(shed=False)
    assert m.shed_share() == 0 and m.update() is True
    clock.advance(20)
    assert m.update() is False and changes[-1][0] is False


def test_a_few_refusals_among_many_arrivals_do_not_degrade(clock):
    m = monitor(clock, [])
    for _second in range(30):
        for i in range(10):
            m.observe_arrival(shed=(i < 2))  # 20 % shed, under 25 %
        assert m.update() is False
        clock.advance(1)


def test_the_shed_window_is_bounded_in_samples(clock):
    m = monitor(clock, [])
    for _ in range(MAX_SAMPLES):
        m.observe_arrival(shed=True)
    for _ in range(MAX_SAMPLES):
        m.observe_arrival(shed=False)
    assert m.shed_share() == 0.0


# ---- policy, config, stream scanning ------------------------------------------------------------------------

def test_single_user_mode_drops_rate_limits_and_takes_the_larger_output_cap():
    table = default_table()
    dev = table.get("DEV_32G")
    eff = effective(dev.limits, "multi", "DEV_32G", table=table, single_user=True)
    assert eff.mode == "single"
    assert (eff.limits.rate_qps, eff.limits.rate_tpm, eff.limits.queue_size) == (None, None, 1)
    assert eff.limits.max_output_tokens == 512
    assert eff.limits.max_input_tokens + 512 == dev.limits.max_input_tokens + dev.limits.max_output_tokens
    forced = effective(dev.limits, "multi", "DEV_32G", table=table, force_profile="SRV_80G")
    assert (forced.profile, forced.limits) == ("SRV_80G", table.get("SRV_80G").limits)
    assert effective(dev.limits, "multi", "DEV_32G", table=table, single_user=False).limits == dev.limits


def test_static_entry_overrides_profile_limits_in_either_case():
    spec = spec_from_config(ModelConfig(name="m", url="http://x/", profile="DEV_32G",
                                        limits={"maxInputTokens": 100, "degrade": {"holdS": 1}, "queue_size": 3}),
                            default_table())
    assert spec.urls == ("http://x",)
    assert (spec.limits.max_input_tokens, spec.limits.degrade.hold_s, spec.limits.queue_size) == (100, 1, 3)
    with pytest.raises(ValueError, match="profile 'NOPE'"):
        spec_from_config(ModelConfig(name="m", url="http://x", profile="NOPE"), default_table())


USAGE_CHUNK = b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}\n\n'
TOKEN_CHUNK = b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'


def test_stream_scan_passes_bytes_through_and_takes_the_usage_chunk():
    out, usage, done = scan_stream(TOKEN_CHUNK, strip_usage=True)
    assert (out, usage, done) == (TOKEN_CHUNK, None, False)
    batch = TOKEN_CHUNK + USAGE_CHUNK + b"data: [DONE]\n\n"
    out, usage, done = scan_stream(batch, strip_usage=True)
    assert out == TOKEN_CHUNK + b"data: [DONE]\n\n" and usage["total_tokens"] == 5 and done
    out, usage, _ = scan_stream(batch, strip_usage=False)
    assert out == batch and usage["completion_tokens"] == 2


def test_stream_scan_takes_the_last_usage_and_passes_over_null_usage():
    """vLLM's continuous usage stats put a running usage in every chunk: the last one is the total."""
    running = b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"a"}}],"usage": {"total_tokens":4}}\n\n'
    null = b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"b"}}],"usage":null}\n\n'
    batch = running + USAGE_CHUNK + null + b"data: [DONE]\n\n"
    out, usage, done = scan_stream(batch, strip_usage=True)
    assert usage["total_tokens"] == 5 and done and out == running + null + b"data: [DONE]\n\n"
    out, usage, done = scan_stream(running + null, strip_usage=True)
    assert (out, usage["total_tokens"], done) == (running + null, 4, False)
    assert scan_stream(null, strip_usage=True) == (null, None, False)


def test_the_shipped_examples_load(monkeypatch):
    from cxygpt_gateway.app import create_app
    from cxygpt_gateway.settings import load_settings
    from harness import REPO
    monkeypatch.setenv("CLOUD_API_KEY", "sk-test")
    settings = load_settings(REPO / "gateway" / "examples" / "gateway.yaml")
    assert settings.keys_file.endswith("keys.yaml") and settings.auto_degrade
    create_app(settings)


async def test_registry_keeps_queues_and_in_flight_counts_across_discovery_updates(clock):
    from cxygpt_gateway.discovery.base import ModelSpec
    from cxygpt_gateway.routing.registry import Registry
    table = default_table()
    registry = Registry(table, clock=clock)
    limits = table.get("DEV_32G").limits
    registry.upsert(ModelSpec(name="m", urls=("http://a",), limits=limits, mode="multi", profile="DEV_32G"))
    route = registry.get("m")
    slot = await take(route.queue)
    registry.upsert(ModelSpec(name="m", urls=("http://a", "http://b"), limits=limits.model_copy(
        update={"max_concurrency": 1}), mode="multi", profile="DEV_32G"))
    assert registry.get("m") is route and route.limits.max_concurrency == 1
    assert route.queue.backends["http://a"].outstanding == 1
    assert (await take(route.queue)).backend.url == "http://b"  # the new replica, least outstanding
    registry.remove("m")
    slot.release()  # a request in flight on a removed model still ends cleanly
    assert registry.get("m") is None and registry.routable() == []


async def test_the_gateway_count_discovered_sets_every_models_share_and_a_larger_share_lets_a_waiter_go(clock):
    from cxygpt_gateway.discovery.base import ModelSpec
    from cxygpt_gateway.routing.registry import Registry
    table = default_table()
    registry = Registry(table, clock=clock, gateways=4)         # the setting: 4 gateways, each 1 of 4 slots
    limits = table.get("DEV_32G").limits.model_copy(update={"max_concurrency": 4})
    registry.upsert(ModelSpec(name="m", urls=("http://a",), limits=limits, mode="multi", profile="DEV_32G"))
    queue = registry.get("m").queue
    queue.backends["http://a"].others = 4                       # the engine is full of other gateways' requests
    first = await asyncio.wait_for(take(queue), 1)           # this gateway's share is still its own
    second = asyncio.ensure_future(take(queue))
    await asyncio.sleep(0)
    assert not second.done() and queue.share == 1
    registry.set_gateways(2)                                     # its Service lists two ready gateways
    assert (await asyncio.wait_for(second, 1)).backend.url == "http://a" and queue.share == 2
    registry.upsert(ModelSpec(name="n", urls=("http://b",), limits=limits, mode="multi", profile="DEV_32G"))
    assert registry.get("n").queue.share == 2 and registry.gateways == 2   # a model added later shares alike
    registry.set_gateways(None)                                  # none listed ready: the setting again
    assert (queue.share, registry.get("n").queue.share) == (1, 1)
    first.release()


def test_upstream_answers_keep_their_4xx_but_an_engine_refusing_the_gateway_is_a_502():
    from cxygpt_gateway.upstream.relay import upstream_error
    overflow = upstream_error(400, b'{"error": {"message": "maximum context length is 4096 tokens"}}')
    assert (overflow.status, overflow.message) == (400, "maximum context length is 4096 tokens")
    for status in (401, 403):  # a 401 from the gateway means the caller's key; this one is the engine's
        refused = upstream_error(status, b'{"error": {"message": "Unauthorized"}}')
        assert refused.status == 502 and f"HTTP {status}" in refused.message and refused.reason == "upstream_auth"
    assert upstream_error(500, b"boom").status == 502


async def test_a_removed_model_answers_its_waiters_at_once(clock):
    from cxygpt_gateway.discovery.base import ModelSpec, Unavailable
    from cxygpt_gateway.routing.registry import Registry
    table = default_table()
    registry = Registry(table, clock=clock)
    limits = table.get("DEV_32G").limits.model_copy(update={"max_concurrency": 1})
    for name in ("gone", "down"):
        registry.upsert(ModelSpec(name=name, urls=("http://a",), limits=limits, mode="multi", profile="DEV_32G"))
    held = [await take(registry.get(n).queue) for n in ("gone", "down")]
    waiting = {n: asyncio.ensure_future(take(registry.get(n).queue)) for n in ("gone", "down")}
    await asyncio.sleep(0)
    registry.remove("gone")  # deleted: 404 now, not a 503 at the end of the queue timeout
    registry.reserve("down", Unavailable("model down is being set up", retry_after_s=7))
    with pytest.raises(GatewayError) as gone:
        await asyncio.wait_for(waiting["gone"], 1)
    with pytest.raises(GatewayError) as down:
        await asyncio.wait_for(waiting["down"], 1)
    assert gone.value.status == 404 and (down.value.status, down.value.headers["Retry-After"]) == (503, "7")
    for slot in held:
        slot.release()
