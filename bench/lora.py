"""The LoRA benchmark (issue 27): many adapters on 4 simulator replicas with --max-loras 2, the gateway's adapter-aware
routing against least-load and round-robin, each swept over rising Poisson arrivals (the same for every front) and
judged by its throughput at the TTFT SLO; writes bench/results/lora-<time>.json and the "LoRA adapters" results
section of BENCHMARKS.md."""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path

import httpx
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fleet as sweeps  # noqa: E402  (bench/fleet.py: its client, its sweep's run and its process handling)
import run  # noqa: E402
from cxygpt_bench import fleet, shapes  # noqa: E402
from cxygpt_bench.load import prompt_of  # noqa: E402
from run import RESULTS, gateway, log, simulator  # noqa: E402

MARK_BEGIN, MARK_END = "<!-- lora-sweep:begin (bench/lora.py writes this section) -->", "<!-- lora-sweep:end -->"
REPLICAS = 4
SLOTS = 8
MAX_LORAS = 2
ADAPTERS = 8
# every replica has every adapter loaded (no evictions, no load time: what differs between fronts is only where each
# request goes), 8 slots, at most 2 adapters in a batch: a request whose adapter is not among the running ones waits
# in the engine as vLLM's scheduler makes it wait
SIM_ARGS = ("--max-num-seqs", str(SLOTS), "--ttft-ms", "30", "--itl-ms", "25", "--sim-itl-batch-slope", "0.03",
            "--enable-lora", "--max-loras", str(MAX_LORAS), "--max-cpu-loras", str(ADAPTERS),
            "--sim-lora-load-gib-per-s", "0")
LIMITS = sweeps.FLEET_LIMITS  # the gateway refuses nothing of its own: the fronts differ only in routing
FRONTS = {"gw-adapter-aware": "prefix", "gw-least-load": "least-load", "gw-round-robin": "round-robin"}
GRID = (4.0, 6.0, 8.0, 10.0, 12.0, 14.0, 16.0, 18.0, 20.0)
PROMPT_TOKENS = (100, 400)
OUTPUT_TOKENS = 48
ZIPF_S = 1.0  # --popularity zipf: the i-th adapter asked for in proportion to 1 / i^s (the first: 37 % of requests)


def marks(popularity: str) -> tuple[str, str]:
    """BENCHMARKS.md's section of a popularity (the uniform one's marks are the first run's)."""
    if popularity == "uniform":
        return MARK_BEGIN, MARK_END
    return (f"<!-- lora-sweep {popularity}:begin (bench/lora.py writes this section) -->",
            f"<!-- lora-sweep {popularity}:end -->")


def popularity_weights(popularity: str, n: int) -> list[float]:
    return [1.0] * n if popularity == "uniform" else [1 / (i + 1) ** ZIPF_S for i in range(n)]


class AdapterLoad:
    """Independent streamed chat requests, each for one of the adapters (uniformly or by Zipf's law, seeded by its
    index: every front gets the same ones), a prompt of its own (so that requests have homes of their own) and a
    fixed output length."""
    chat = False

    def __init__(self, adapters: list[str], seed: int, popularity: str = "uniform"):
        self.adapters, self.seed = adapters, seed
        self.weights = None if popularity == "uniform" else popularity_weights(popularity, len(adapters))
        self.asked: dict[int, str] = {}

    def body(self, index: int) -> tuple[str, bytes, dict]:
        rng = random.Random(f"{self.seed}:{index}")
        adapter = self.asked[index] = (rng.choices(self.adapters, self.weights)[0] if self.weights
                                       else rng.choice(self.adapters))
        text = f"Request {index} of {self.seed}: " + prompt_of(rng.randint(*PROMPT_TOKENS))
        body = {"model": adapter, "stream": True, "stream_options": {"include_usage": True},
                "max_tokens": OUTPUT_TOKENS, "ignore_eos": True, "temperature": 0,
                "messages": [{"role": "user", "content": text}]}
        return shapes.CHAT, orjson.dumps(body), {"Content-Type": "application/json"}


def adapter_repos(root: Path) -> dict[str, Path]:
    from cxygpt_dev.hub import make_adapter_repo
    return {f"lora-{i}": make_adapter_repo(root, f"bench/lora-{i}", base_model="Qwen/Qwen3-14B")
            for i in range(ADAPTERS)}


def start_replicas(logs: Path, repos: dict[str, Path]) -> list[run.Proc]:
    modules = [f"{name}={path}" for name, path in repos.items()]
    sims = [simulator(logs, *SIM_ARGS, "--lora-modules", *modules, wait=False) for _ in range(REPLICAS)]
    try:
        for s in sims:
            s.wait_ready()
    except RuntimeError:
        sweeps.stop_all(sims)
        raise
    return sims


def idle(urls: list[str], timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = sweeps.read_metrics(urls)
        if all(m.get("vllm:num_requests_running", 0) + m.get("vllm:num_requests_waiting", 0) == 0 for m in got):
            return True
        time.sleep(0.2)
    return False


def start_front(logs: Path, urls: list[str], policy: str, adapters: list[str]) -> run.Proc:
    """The gateway with the base model and its adapters, once it has read every replica's adapters."""
    proc = gateway(logs, urls, LIMITS, profile="SRV_80G",
                   model_settings={"routing": {"policy": policy}, "adapters": adapters})

    def seen() -> bool:
        views = httpx.get(proc.url + "/v1/limits", timeout=5).json()["models"]
        return all(views[a]["loaded_on"] == len(urls) for a in adapters)
    deadline = time.monotonic() + 30
    while not seen():
        if time.monotonic() > deadline:
            proc.stop()
            raise RuntimeError("the gateway did not see the adapters loaded on every replica within 30 s")
        time.sleep(0.2)
    return proc


def sweep_front(front: str, proc: run.Proc, sims: list[run.Proc], a, notes: list[str]) -> list[dict]:
    """One front over the grid's rates, back to back after a lead-in at the first; each stage summarized, up to the
    first that misses the SLO (all of them with --full-sweep)."""
    stages = [(r, a.duration) for r in a.grid]
    times = [t for t, _ in shapes.ramp(f"lora:{a.seed}", [(a.grid[0], a.lead)] + stages)]
    load = AdapterLoad([f"lora-{i}" for i in range(ADAPTERS)], a.seed, a.popularity)
    client = sweeps.Client(load, sweeps.picker([proc]), stages=stages, lead=a.lead, grace=a.grace,
                           timeout=a.timeout, sims=[s.url for s in sims], sample_s=0.25,
                           pids={"sims": [s.pid for s in sims], "front": [proc.pid]}, judge=None, times=times)

    sweeps.stage_judge(client, a, lambda k: f"{front:18s} {a.grid[k]:5.1f}/s")
    loadavg = os.getloadavg()[0]
    elapsed = sweeps.run_client(client)
    points = []
    for k in range(client.judged):
        start, end = client.bounds[k], client.bounds[k + 1]
        r = fleet.summarize(client.results, start=start, end=end, stopped_at=client.stopped_at, slo_s=a.slo_ttft_s,
                            samples=client.samples)
        (t0, c0), (t1, c1) = client.cpu[k], client.cpu[k + 1]
        cpu = {"client": round((c1["client"] - c0["client"]) / (t1 - t0), 2),
               "front": round((sum(c1["front"]) - sum(c0["front"])) / (t1 - t0), 2),
               "sims_total": round((sum(c1["sims"]) - sum(c0["sims"])) / (t1 - t0), 2)}
        r.update(front=front, offered_rps=a.grid[k], cpu_cores=cpu, loadavg=loadavg)
        if cpu["client"] >= sweeps.CPU_BOUND or cpu["front"] >= sweeps.CPU_BOUND:
            notes.append(f"{front} at {a.grid[k]:g}/s: the client used {cpu['client']} cores, the gateway "
                         f"{cpu['front']} (≥ {sweeps.CPU_BOUND}: latencies may include waiting for a core)")
        log(f"{front:18s} {a.grid[k]:5.1f}/s: sent {r['sent']:4d} err {r['errors']:3d} cut {r['cut']:3d} TTFT "
            f"p50/p90/p99 {fleet.fmt(r['ttft_p50_ms'])}/{fleet.fmt(r['ttft_p90_ms'])}/{fleet.fmt(r['ttft_p99_ms'])} "
            f"ms goodput {r['goodput_rps']:5.2f}/s served per replica {r['served_per_replica']} cpu client "
            f"{cpu['client']} gateway {cpu['front']} sims {cpu['sims_total']}")
        points.append(r)
    log(f"{front}: swept in {elapsed:.0f} s (load average {loadavg:.1f} at its start)")
    return points


def render(r: dict) -> str:
    """BENCHMARKS.md's section: the command, the set-up, each front's throughput at the SLO and its points."""
    begin, end = marks(r.get("popularity", "uniform"))
    hottest = 100 / sum(popularity_weights("zipf", ADAPTERS))
    asked = ("uniformly" if r.get("popularity", "uniform") == "uniform"
             else f"by Zipf's law with s = {ZIPF_S:g}, the first adapter {hottest:.0f} % of requests")
    lines = [begin, "", f"Run {r['started']} on {r['machine']} (revision {r['revision']}; {r['load_before']} "
             f"before, {r['load_during']} during), {r['elapsed_s']:.0f} s:", "", "```sh", r["command"], "```", "",
             f"{REPLICAS} replicas, `{' '.join(SIM_ARGS)}`, {ADAPTERS} adapters on each, requests for them {asked} "
             f"(prompts of {PROMPT_TOKENS[0]}–{PROMPT_TOKENS[1]} tokens, {OUTPUT_TOKENS} out); Poisson arrivals, the "
             f"same for every front, in stages of {r['duration_s']:g} s at {', '.join(f'{x:g}' for x in r['grid'])} "
             f"req/s; SLO: p90 TTFT ≤ {r['slo_ttft_s']:g} s and no error.", "",
             "| front | throughput at the SLO (req/s) | first miss | TTFT p90 at each rate (ms) | errors |",
             "|---|---|---|---|---|"]
    for front, points in r["points"].items():
        t = r["throughput"][front]
        value = "-" if t["value"] is None else f"{t['value']:.1f}" + (" (every rate met it)" if t["hi"] == fleet.INF
                                                                      else "")
        miss = "-" if t["first_miss"] is None else f"{t['first_miss']:g}/s ({t['why']})"
        p90 = ", ".join(f"{p['offered_rps']:g}: {fleet.fmt(p['ttft_p90_ms'])}" for p in points)
        lines.append(f"| {front} | {value} | {miss} | {p90} | {sum(p['errors'] for p in points)} |")
    if r["notes"]:
        lines += ["", "Notes: " + "; ".join(r["notes"])]
    lines += ["", end]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--fronts", nargs="+", choices=list(FRONTS), help=f"default: {' '.join(FRONTS)}")
    ap.add_argument("--grid", type=float, nargs="+", help=f"offered rates, req/s (default {' '.join(map(str, GRID))})")
    ap.add_argument("--full-sweep", action="store_true", help="every rate for every front (default: a front's sweep "
                    "stops at its first stage that misses the SLO)")
    ap.add_argument("--slo-ttft-s", type=float, default=sweeps.SLO_TTFT_S,
                    help="the SLO on p90 TTFT (default %(default)s)")
    ap.add_argument("--duration", type=float, default=8.0, help="seconds of each stage (default %(default)s)")
    ap.add_argument("--lead", type=float, default=2.0, help="seconds at the first rate before the first stage")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per request (more is an error)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--popularity", choices=["uniform", "zipf"], default="uniform",
                    help="how requests spread over the adapters (default uniform; zipf: a few hot adapters)")
    ap.add_argument("--no-write", action="store_true", help="print, do not write results or BENCHMARKS.md")
    a = ap.parse_args(argv)
    a.grid = sorted(a.grid or GRID)
    a.grace = a.slo_ttft_s + 1
    if a.lead <= 0 or a.duration <= 0 or min(a.grid) <= 0 or a.slo_ttft_s <= 0:
        raise SystemExit("need a positive --lead, --duration, rates and SLO")
    fronts = a.fronts or list(FRONTS)
    args = list(argv if argv is not None else sys.argv[1:])
    started = time.monotonic()
    notes: list[str] = []
    r: dict = {"started": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
               "command": "python bench/lora.py" + (" " + shlex.join(args) if args else ""),
               "machine": f"{os.cpu_count()} CPUs, {platform.python_implementation()} {platform.python_version()}",
               "load_before": sweeps.loadavg(), "revision": sweeps.revision(), "notes": notes, "replicas": REPLICAS,
               "sim_args": list(SIM_ARGS), "adapters": ADAPTERS, "gateway_limits": LIMITS,
               "slo_ttft_s": a.slo_ttft_s, "duration_s": a.duration, "lead_s": a.lead, "grid": a.grid,
               "full_sweep": a.full_sweep, "fronts": fronts, "popularity": a.popularity, "points": {}}
    log(f"LoRA benchmark started ({r['load_before']})")
    with tempfile.TemporaryDirectory(prefix="cxygpt-lora-") as tmp:
        logs = Path(tmp)
        repos = adapter_repos(logs / "repos")
        sims = start_replicas(logs, repos)
        try:
            for front in fronts:
                if not idle([s.url for s in sims]):
                    notes.append(f"before {front}: the replicas still held requests a minute after the last sweep")
                proc = start_front(logs, [s.url for s in sims], FRONTS[front], list(repos))
                try:
                    r["points"][front] = sweep_front(front, proc, sims, a, notes)
                finally:
                    sweeps.stop_all([proc])
        finally:
            sweeps.stop_all(sims)
    slo_ms = a.slo_ttft_s * 1000
    r["throughput"] = {f: fleet.throughput_at_slo(ps, slo_ms) for f, ps in r["points"].items()}
    during = [p["loadavg"] for ps in r["points"].values() for p in ps]
    r["load_during"] = f"load average {min(during):.1f}–{max(during):.1f}" if during else "-"
    r["elapsed_s"] = time.monotonic() - started
    for front, t in r["throughput"].items():
        log(f"{front}: throughput at the SLO {t['value'] if t['value'] is None else round(t['value'], 2)} req/s "
            f"(first miss {t['first_miss']}: {t['why']})")
    if not a.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"lora-{dt.datetime.now(dt.UTC).strftime('%Y%m%d-%H%M%S')}.json"
        path.write_text(json.dumps(r, indent=1, default=str))
        run.write_benchmarks(render(r), marks(a.popularity),
                             f"LoRA adapters (issue 27): latest results, {a.popularity} popularity")
        log(f"wrote {path} and BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
