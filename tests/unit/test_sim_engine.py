"""Engine core with a fake clock: slots, KV blocks, waiting queue, preemption, cancel and the speed model."""
import pytest

from cxygpt_profiles import default_catalog, default_table
from cxygpt_profiles.roofline import StepShape, Workload
from cxygpt_profiles.speed import step_model
from cxygpt_sim.engine import Capacity, Scheduler, Sequence
from cxygpt_sim.speed import TEST_PROFILES, GpuSpeed, Speed, knob_base

STEADY = Speed(ttft_ms=100, itl_ms=10, prefill_ms_per_1k=0, itl_batch_slope=0)


def run(scheduler: Scheduler, now: float = 0.0, until=lambda s: not s.has_work) -> float:
    """Drive the engine like the server loop does, with time advancing by each step's duration."""
    while not until(scheduler):
        now += scheduler.begin_step(now).duration_s
        scheduler.end_step(now)
    return now


def seqs(n, prompt=8, output=10):
    """Distinct prompts, so nothing comes from the prefix cache."""
    return [Sequence(id=str(i), prompt_ids=[1000 * i + t for t in range(prompt)], output_tokens=output, arrived=0.0)
            for i in range(n)]


def test_at_most_max_num_seqs_run_and_the_rest_wait():
    s = Scheduler(Capacity(max_num_seqs=4, kv_blocks=1000), STEADY)
    for q in seqs(12):
        s.submit(q)
    step = s.begin_step(0.0)
    assert (len(s.running), len(s.waiting), step.admitted) == (4, 8, 4)


def test_waves_of_ttft_follow_queueing():
    s = Scheduler(Capacity(max_num_seqs=4, kv_blocks=1000), STEADY)
    all_seqs = seqs(12)
    for q in all_seqs:
        s.submit(q)
    run(s)
    # a wave: 100 ms prefill (first token) + 9 decode steps of 10 ms; the next wave starts after it
    for wave in range(3):
        for q in all_seqs[wave * 4:(wave + 1) * 4]:
            assert q.first_token_at == pytest.approx(0.1 * (wave + 1) + 0.09 * wave)
            assert q.generated == 10 and q.state == "finished"


def h100(repo="Qwen/Qwen3-14B", kv="auto"):
    return step_model("h100-80g", Workload(default_catalog().lookup(repo), "bf16", kv, 1, default_table().fit), repo)


def test_a_step_grows_with_prefill_tokens_batch_and_context():
    speed = GpuSpeed(h100())

    def step(prefill=0, decoding=1, context=100):
        return speed.step_s(StepShape(prefill=((prefill, 0),) if prefill else (), decode_count=decoding,
                                      decode_context=decoding * context))
    assert step(prefill=4000) > step(prefill=100) > step() > 0
    assert step(decoding=64) > step(decoding=1)
    assert step(context=100_000) > step(context=100)
    assert speed.step_s(StepShape()) == 0


def test_the_knobs_keep_their_meaning_on_an_idle_engine():
    speed = Speed(ttft_ms=100, itl_ms=10, prefill_ms_per_1k=50, itl_batch_slope=0.1, context_ms_per_1k=1)
    # a short prompt alone: --ttft-ms (plus its tiny prefill and context); one decoding sequence: --itl-ms
    assert speed.step_s(StepShape(prefill=((1, 0),))) == pytest.approx(0.100051)
    assert speed.step_s(StepShape(decode_count=1, decode_context=0)) == pytest.approx(0.010)
    assert speed.step_s(StepShape(decode_count=11, decode_context=2000)) == pytest.approx(0.022)


def test_a_request_without_kv_blocks_waits_at_the_head():
    # 3 blocks of 16: a 20-token prompt needs 2 blocks to start, so only one runs
    s = Scheduler(Capacity(max_num_seqs=4, kv_blocks=3, block_size=16), STEADY)
    a, b = seqs(2, prompt=20, output=5)
    s.submit(a)
    s.submit(b)
    s.begin_step(0.0)
    assert s.running == [a] and list(s.waiting) == [b]
    run(s)
    assert a.state == b.state == "finished"
    assert b.scheduled_at > a.first_token_at


def test_the_newest_sequence_is_preempted_when_blocks_run_out_and_resumes_later():
    s = Scheduler(Capacity(max_num_seqs=4, kv_blocks=4, block_size=4), STEADY)
    a, b = seqs(2, prompt=3, output=8)
    s.submit(a)
    s.submit(b)
    run(s)
    assert a.state == b.state == "finished" and a.generated == b.generated == 8
    assert b.preemptions >= 1 and s.preemptions_total == b.preemptions + a.preemptions
    assert s.free_blocks == 4


def test_cancel_frees_the_slot_at_once():
    s = Scheduler(Capacity(max_num_seqs=1, kv_blocks=100), STEADY)
    a, b = seqs(2)
    s.submit(a)
    s.submit(b)
    now = s.begin_step(0.0).duration_s
    s.end_step(now)
    s.cancel(a)
    assert (len(s.running), len(s.waiting), s.kv_usage) == (0, 1, 0)
    s.begin_step(now)
    assert s.running == [b] and a.state == "cancelled"


def test_cancel_during_a_step_drops_the_sequence_from_that_step():
    s = Scheduler(Capacity(max_num_seqs=2, kv_blocks=100), STEADY)
    a, b = seqs(2)
    s.submit(a)
    s.submit(b)
    now = s.begin_step(0.0).duration_s
    s.cancel(a)
    assert [p.seq for p in s.end_step(now)] == [b]


def test_instant_decode_finishes_a_request_in_one_step():
    s = Scheduler(Capacity(max_num_seqs=8, kv_blocks=100), TEST_PROFILES["instant"])
    (a,) = seqs(1, output=50)
    s.submit(a)
    assert s.begin_step(0.0).duration_s == 0
    (p,) = s.end_step(0.0)
    assert (p.new_tokens, p.done, a.generated) == (50, True, 50)


def test_progress_reports_gaps_between_tokens():
    s = Scheduler(Capacity(max_num_seqs=1, kv_blocks=100), STEADY)
    (a,) = seqs(1, output=2)
    s.submit(a)
    t = s.begin_step(0.0).duration_s
    (first,) = s.end_step(t)
    t2 = t + s.begin_step(t).duration_s
    (second,) = s.end_step(t2)
    assert first.gap_s is None and second.gap_s == pytest.approx(0.01) and second.done


def test_jitter_is_deterministic_with_a_seed():
    speed = Speed(ttft_ms=100, itl_ms=10, prefill_ms_per_1k=0, itl_batch_slope=0, jitter=0.5)

    def durations(seed):
        s = Scheduler(Capacity(max_num_seqs=2, kv_blocks=100), speed, seed=seed)
        for q in seqs(2):
            s.submit(q)
        out, now = [], 0.0
        while s.has_work:
            d = s.begin_step(now).duration_s
            out.append(d)
            now += d
            s.end_step(now)
        return out

    assert durations(7) == durations(7) != durations(8)
    assert all(0.05 <= d <= 0.15 for d in durations(7)[:1])


def test_overrides_scale_prefill_with_ttft_so_zero_means_instant():
    base = knob_base(h100())
    assert base.with_overrides(ttft_ms=0, itl_ms=0).step_s(StepShape(prefill=((10_000, 0),), decode_count=7,
                                                                     decode_context=40_000)) == 0
    assert base.with_overrides(itl_ms=base.itl_ms * 2).context_ms_per_1k == pytest.approx(base.context_ms_per_1k * 2)
    assert base.with_overrides(ttft_ms=base.ttft_ms * 2).prefill_ms_per_1k == base.prefill_ms_per_1k * 2
    assert base.with_overrides(ttft_ms=0, prefill_ms_per_1k=5).prefill_ms_per_1k == 5
