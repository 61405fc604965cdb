"""LoRA adapters on a real `cxygpt-sim` process through the official OpenAI SDK: requests to adapters, /v1/models,
loads and unloads at runtime with no request lost, the --max-loras wait in TTFT and in the metric, the cost of a
load and of an adapter evicted from the CPU cache, every refusal's status and message, adapters from the local Hub."""
import json
import os
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cxygpt_dev.hub import make_adapter_repo, write_safetensors
from harness import ServerProcess, console_script, free_port, wait_until

BASE = "qwen3-0.6b"
MESSAGES = [{"role": "user", "content": "Summarise continuous batching."}]
pytestmark = pytest.mark.timeout(120)


def sim_argv(port: int, *extra: str) -> list[str]:
    return [console_script("cxygpt-sim"), "serve", "Qwen/Qwen3-0.6B", "--served-model-name", BASE, "--host",
            "127.0.0.1", "--port", str(port), "--max-model-len", "4096", "--speed-profile", "fast", "--ttft-ms", "5",
            "--itl-ms", "10", "--enable-lora", *extra]


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    made = {name: make_adapter_repo(root, f"t/{name}", base_model="Qwen/Qwen3-0.6B", **kw) for name, kw in (
        ("sql", {}), ("support", {"rank": 16, "target_modules": ("q_proj", "k_proj", "v_proj", "o_proj")}),
        ("fresh", {}), ("temp", {}), ("rank64", {"rank": 64}), ("dora", {"config": {"use_dora": True}}),
        ("noconfig", {}), ("notensors", {}))}
    made["qwen3-8b"] = make_adapter_repo(root, "t/qwen3-8b", base_model="Qwen/Qwen3-8B")
    (made["noconfig"] / "adapter_config.json").write_text(json.dumps({"lora_alpha": 16, "target_modules": ["q_proj"]}))
    (made["notensors"] / "adapter_model.safetensors").unlink()
    gpt2 = root / "t/gpt2"
    gpt2.mkdir()
    (gpt2 / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16, "target_modules": ["c_attn"]}))
    write_safetensors(gpt2 / "adapter_model.safetensors",
                      {"base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": [8, 768],
                       "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight": [2304, 8]}, "gpt2")
    made["gpt2"] = gpt2
    return made


@pytest.fixture(scope="module")
def sim(tmp_path_factory, repos):
    port = free_port()
    support = json.dumps({"name": "support", "path": str(repos["support"]), "base_model_name": BASE})
    argv = sim_argv(port, "--max-loras", "1", "--max-cpu-loras", "8", "--lora-modules", f"sql={repos['sql']}",
                    support)
    with ServerProcess(argv, port=port, log_path=tmp_path_factory.mktemp("sim") / "sim.log",
                       env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}) as proc:
        yield proc


@pytest.fixture
def client(sim):
    with openai.OpenAI(base_url=sim.url + "/v1", api_key="unused", max_retries=0, timeout=30) as c:
        yield c


def load(client, name: str, path, **extra) -> str:
    return client.post("/load_lora_adapter", body={"lora_name": name, "lora_path": str(path), **extra}, cast_to=str)


def unload(client, name: str) -> str:
    return client.post("/unload_lora_adapter", body={"lora_name": name}, cast_to=str)


def refused(call, *args, **kwargs) -> tuple[int, dict]:
    with pytest.raises(openai.APIStatusError) as e:
        call(*args, **kwargs)
    return e.value.status_code, e.value.body


def metrics(sim) -> dict:
    return {f.name: f for f in text_string_to_metric_families(httpx.get(sim.url + "/metrics", timeout=5).text)}


def newest_lora_info(sim) -> dict | None:
    samples = metrics(sim)["vllm:lora_requests_info"].samples
    return max(samples, key=lambda s: s.value).labels if samples else None


def test_adapters_are_listed_with_their_parent_and_path(client, repos):
    cards = {m.id: m for m in client.models.list().data}
    assert list(cards)[:3] == [BASE, "sql", "support"]
    assert (cards[BASE].parent, cards[BASE].root, cards[BASE].max_model_len) == (None, "Qwen/Qwen3-0.6B", 4096)
    assert (cards["sql"].parent, cards["sql"].root, cards["sql"].max_model_len) == (BASE, str(repos["sql"]), None)
    assert cards["support"].parent == BASE and cards["support"].owned_by == "vllm"
    assert cards["sql"].permission[0]["object"] == "model_permission"
    assert client.models.retrieve("sql").parent == BASE


def test_a_request_names_an_adapter_by_its_model_and_the_answer_carries_it(client):
    r = client.chat.completions.create(model="sql", messages=MESSAGES, max_tokens=5)
    assert r.model == "sql" and r.usage.completion_tokens == 5 and r.choices[0].message.content
    chunks = list(client.completions.create(model="support", prompt="SELECT", max_tokens=4, stream=True))
    assert {c.model for c in chunks} == {"support"} and "".join(c.choices[0].text for c in chunks)
    assert client.chat.completions.create(model=BASE, messages=MESSAGES, max_tokens=2).model == BASE
    status, body = refused(client.chat.completions.create, model="nope", messages=MESSAGES)
    assert (status, body["message"]) == (404, f"The model `nope` does not exist. Valid aliases: {BASE}.")


def stream_times(client, model: str, max_tokens: int, out: dict) -> None:
    """Streams one request; records when it was sent, its first and its last token (monotonic)."""
    out["sent"] = time.monotonic()
    for chunk in client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=max_tokens, stream=True,
                                                extra_body={"ignore_eos": True}):
        if chunk.choices and chunk.choices[0].delta.content:
            out.setdefault("first", time.monotonic())
            out["last"] = time.monotonic()
            out["tokens"] = out.get("tokens", 0) + 1


def test_a_request_for_a_second_adapter_waits_for_the_first_under_max_loras_one(sim, client):
    sql, support, base = {}, {}, {}
    long = threading.Thread(target=stream_times, args=(client, "sql", 300, sql))
    long.start()
    wait_until(lambda: "first" in sql, timeout=20, what="the sql stream's first token")
    waiting = threading.Thread(target=stream_times, args=(client, "support", 3, support))
    waiting.start()
    # while support waits for sql's slot: one request waiting, and the metric shows sql alone running
    wait_until(lambda: metrics(sim)["vllm:num_requests_waiting"].samples[0].value == 1, timeout=10,
               what="the support request waiting")
    assert newest_lora_info(sim) == {"max_lora": "1", "running_lora_adapters": "sql", "waiting_lora_adapters": "sql"}
    stream_times(client, BASE, 3, base)  # a base request is not held back
    long.join(30)
    waiting.join(30)
    assert sql["tokens"] == 300 and support["tokens"] == 3
    assert base["first"] < sql["last"]  # it went on while sql still ran
    assert support["first"] >= sql["last"] - 0.05  # support's first token came only after sql's last
    assert support["first"] - support["sent"] > base["first"] - base["sent"]
    wait_until(lambda: newest_lora_info(sim)["running_lora_adapters"] == "", timeout=10, what="no adapter running")
    shown = {s.labels["running_lora_adapters"] for s in metrics(sim)["vllm:lora_requests_info"].samples}
    assert {"sql", "support", ""} <= shown


def test_adapters_load_and_unload_under_steady_load_and_no_request_is_lost(sim, client, repos):
    outcomes, stop, lock = [], threading.Event(), threading.Lock()
    targets = [BASE, "sql"]

    def worker(i: int):
        n = 0
        while not stop.is_set():
            model = targets[(i + n) % len(targets)]
            n += 1
            sent = time.monotonic()
            try:
                r = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8,
                                                   extra_body={"ignore_eos": True})
                result = ("ok", r.model, r.usage.completion_tokens)
            except openai.NotFoundError as e:
                result = ("404", model, e.body["message"])
            except Exception as e:  # anything else is a lost request
                result = ("lost", model, repr(e))
            with lock:
                outcomes.append((sent, *result))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.3)
        assert load(client, "fresh", repos["fresh"]) == "Success: LoRA adapter 'fresh' added successfully."
        loaded = time.monotonic()
        targets.append("fresh")  # answers at once: its first request gets it
        assert load(client, "temp", repos["temp"]) == "Success: LoRA adapter 'temp' added successfully."
        targets.append("temp")
        wait_until(lambda: sum(o[1] == "ok" and o[2] == "temp" for o in outcomes) >= 3, timeout=30,
                   what="requests to temp")
        in_flight = {}
        streaming = threading.Thread(target=stream_times, args=(client, "temp", 60, in_flight))
        streaming.start()
        wait_until(lambda: "first" in in_flight, timeout=20, what="a temp stream under way")
        unloading = time.monotonic()
        assert unload(client, "temp") == "Success: LoRA adapter 'temp' removed successfully."
        streaming.join(30)
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert in_flight["tokens"] == 60  # the request running with temp when it was unloaded ended whole
    assert [o for o in outcomes if o[1] == "lost"] == []
    for sent, kind, model, detail in outcomes:
        if kind == "ok":
            assert detail == 8
        else:  # only temp, and only asked for once its unload began
            assert model == "temp" and sent >= unloading
            assert detail == f"The model `temp` does not exist. Valid aliases: {BASE}."
    fresh = [o for o in outcomes if o[2] == "fresh"]
    assert fresh and all(o[1] == "ok" for o in fresh) and min(o[0] for o in fresh) >= loaded
    assert any(o[1] == "404" for o in outcomes), "no request named temp after its unload"
    assert "temp" not in {m.id for m in client.models.list().data}


def test_a_request_running_when_its_adapter_is_unloaded_ends_as_that_adapters(sim, client, repos):
    load(client, "brief", repos["fresh"])
    answer = {}
    running = threading.Thread(target=lambda: answer.update(r=client.chat.completions.create(
        model="brief", messages=MESSAGES, max_tokens=100, extra_body={"ignore_eos": True})))
    running.start()
    wait_until(lambda: metrics(sim)["vllm:num_requests_running"].samples[0].value == 1, timeout=20,
               what="the request running")
    unload(client, "brief")
    running.join(30)
    assert (answer["r"].model, answer["r"].usage.completion_tokens) == ("brief", 100)
    assert refused(client.chat.completions.create, model="brief", messages=MESSAGES)[0] == 404


def test_every_refusal_has_vllms_status_and_message(sim, client, repos):
    before = [m.id for m in client.models.list().data]
    cases = [
        ({"lora_name": "sql", "lora_path": str(repos["sql"])}, 400, "InvalidUserInput",
         "The lora adapter 'sql' has already been loaded. If you want to load the adapter in place, set "
         "'load_inplace' to True."),
        ({"lora_name": BASE, "lora_path": str(repos["sql"])}, 400, "InvalidUserInput",
         f"The lora adapter '{BASE}' conflicts with a served base model."),
        ({"lora_name": "x", "lora_path": ""}, 400, "InvalidUserInput",
         "Both 'lora_name' and 'lora_path' must be provided."),
        ({"lora_name": "gone", "lora_path": str(repos["sql"]) + "-missing"}, 404, "NotFoundError",
         "Loading lora gone failed: No adapter found for <path>"),
        ({"lora_name": "hub", "lora_path": "some-org/not-here"}, 404, "NotFoundError",
         "Loading lora hub failed: No adapter found for some-org/not-here"),
        ({"lora_name": "big", "lora_path": str(repos["rank64"])}, 500, "InternalServerError",
         "Call to add_lora method failed: LoRA rank 64 is greater than max_lora_rank 16."),
        ({"lora_name": "other", "lora_path": str(repos["qwen3-8b"])}, 500, "InternalServerError",
         "Call to add_lora method failed: The size of tensor a (1024) must match the size of tensor b (4096) at "
         "non-singleton dimension 1"),
        ({"lora_name": "gpt2", "lora_path": str(repos["gpt2"])}, 500, "InternalServerError",
         "Call to add_lora method failed: While loading <path>, expected target modules in {'down_proj', "
         "'gate_proj', 'k_proj', 'o_proj', 'q_proj', 'up_proj', 'v_proj'} but received "
         "['transformer.h.0.attn.c_attn', 'transformer.h.0.attn.c_attn']. Please verify that the loaded LoRA module "
         "is correct"),
        ({"lora_name": "dora", "lora_path": str(repos["dora"])}, 500, "InternalServerError",
         "Call to add_lora method failed: vLLM does not yet support DoRA."),
        ({"lora_name": "nor", "lora_path": str(repos["noconfig"])}, 500, "InternalServerError",
         "Call to add_lora method failed: Missing required configuration fields: {'r'}"),
        ({"lora_name": "empty", "lora_path": str(repos["notensors"])}, 500, "InternalServerError",
         "Call to add_lora method failed: <path> doesn't contain tensors"),
        ({"lora_path": "/a"}, 400, "Bad Request",
         "1 validation error:\n  {'type': 'missing', 'loc': 'body.lora_name', 'msg': 'Field required', "
         "'input': '<dict of 1 items>'}"),
    ]
    for body, status, kind, message in cases:
        got = refused(client.post, "/load_lora_adapter", body=body, cast_to=str)
        assert got == (status, {"message": message, "type": kind, "param": "body.lora_name" if kind == "Bad Request"
                                else None, "code": status}), body
    assert refused(unload, client, "never-loaded") == (404, {"message": "The lora adapter 'never-loaded' cannot be "
                                                                        "found.", "type": "NotFoundError",
                                                             "param": None, "code": 404})
    assert refused(unload, client, "")[0] == 400
    plain = httpx.post(sim.url + "/v1/load_lora_adapter", content=b"lora_name=x", timeout=5,
                       headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert (plain.status_code, plain.json()["error"]["message"]) == (
        400, "1 validation error:\n  Unsupported Media Type: Only 'application/json' is allowed")
    assert [m.id for m in client.models.list().data] == before  # nothing half-loaded
    assert client.chat.completions.create(model=BASE, messages=MESSAGES, max_tokens=2).usage.completion_tokens == 2


def test_an_adapter_reloads_in_place_from_a_new_path(client, repos):
    assert load(client, "sql", repos["fresh"], load_inplace=True) == "Success: LoRA adapter 'sql' added successfully."
    assert client.models.retrieve("sql").root == str(repos["fresh"])
    assert client.chat.completions.create(model="sql", messages=MESSAGES, max_tokens=2).model == "sql"
    load(client, "sql", repos["sql"], load_inplace=True)


def test_without_the_variable_the_endpoints_do_not_exist(tmp_path, repos):
    port = free_port()
    with ServerProcess(sim_argv(port, "--lora-modules", f"sql={repos['sql']}"), port=port,
                       log_path=tmp_path / "sim.log", env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": ""}) as proc, \
            openai.OpenAI(base_url=proc.url + "/v1", api_key="unused", max_retries=0) as c:
        assert refused(load, c, "fresh", repos["fresh"])[0] == 404
        assert c.chat.completions.create(model="sql", messages=MESSAGES, max_tokens=2).model == "sql"


def start_failure(*args: str) -> str:
    run = subprocess.run(sim_argv(free_port(), *args), capture_output=True, text=True, timeout=60)
    assert run.returncode != 0
    return run.stderr.strip().splitlines()[-1]


def test_a_static_adapter_that_fails_stops_the_start_with_its_message(repos):
    assert start_failure("--lora-modules", f"big={repos['rank64']}") == \
        "cxygpt-sim: error: Call to add_lora method failed: LoRA rank 64 is greater than max_lora_rank 16."
    assert start_failure("--lora-modules", f"{BASE}={repos['sql']}") == \
        f"cxygpt-sim: error: The lora adapter '{BASE}' conflicts with a served base model."
    argv = [a for a in sim_argv(0) if a != "--enable-lora"]
    run = subprocess.run(argv + ["--lora-modules", f"sql={repos['sql']}"], capture_output=True, text=True, timeout=60)
    assert run.stderr.strip().splitlines()[-1] == \
        "cxygpt-sim: error: Call to add_lora method failed: LoRA is not enabled. Use --enable-lora to enable LoRA."


def test_a_load_stalls_the_steps_and_an_evicted_adapter_is_read_again(tmp_path, repos):
    size = (repos["fresh"] / "adapter_model.safetensors").stat().st_size
    read_s = 1.0
    port = free_port()
    argv = sim_argv(port, "--max-loras", "1", "--max-cpu-loras", "1", "--sim-lora-load-gib-per-s",
                    f"{size / 2**30 / read_s:.9f}")
    with ServerProcess(argv, port=port, log_path=tmp_path / "sim.log",
                       env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}) as proc, \
            openai.OpenAI(base_url=proc.url + "/v1", api_key="unused", max_retries=0, timeout=30) as c:
        gaps, stream = [], {}

        def watch():
            last = None
            for _ in c.chat.completions.create(model=BASE, messages=MESSAGES, max_tokens=200, stream=True,
                                               extra_body={"ignore_eos": True}):
                now = time.monotonic()
                if last is not None:
                    gaps.append(now - last)
                last = now
                stream["seen"] = True

        watcher = threading.Thread(target=watch)
        watcher.start()
        wait_until(lambda: stream.get("seen"), timeout=20, what="the base stream")
        began = time.monotonic()
        load(c, "x", repos["fresh"])
        assert time.monotonic() - began >= read_s * 0.95
        watcher.join(30)
        assert max(gaps) >= read_s * 0.9  # no token while the adapter was read: vLLM's engine core is busy too
        load(c, "y", repos["temp"])  # the CPU cache holds one: x is evicted

        def ttft(model):
            began = time.monotonic()
            for chunk in c.chat.completions.create(model=model, messages=MESSAGES, max_tokens=2, stream=True):
                if chunk.choices and chunk.choices[0].delta.content:
                    return time.monotonic() - began

        evicted, held = ttft("x"), ttft("x")
        assert evicted >= read_s * 0.95 and held < evicted - read_s / 2


def test_an_adapter_from_the_local_hub_is_downloaded_by_its_repository_id(tmp_path):
    hub_port, port = free_port(), free_port()
    hub = ServerProcess([sys.executable, "-m", "cxygpt_dev.hub", "--root", str(tmp_path / "hub"), "--port",
                         str(hub_port), "--catalog-stand-ins", "1"], port=hub_port, log_path=tmp_path / "hub.log")
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{hub_port}", "HF_HOME": str(tmp_path / "hf-home"),
           "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}
    repo = "cxygpt-demo/qwen3-0.6b-sql-lora"
    with hub, ServerProcess(sim_argv(port, "--max-lora-rank", "16", "--lora-modules", f"sql={repo}"), port=port,
                            log_path=tmp_path / "sim.log", env=env, ready_timeout=60) as proc, \
            openai.OpenAI(base_url=proc.url + "/v1", api_key="unused", max_retries=0, timeout=30) as c:
        assert c.models.retrieve("sql").root == repo
        support = "cxygpt-demo/qwen3-0.6b-support-lora"
        assert load(c, "support", support) == "Success: LoRA adapter 'support' added successfully."
        assert c.chat.completions.create(model="support", messages=MESSAGES, max_tokens=3).model == "support"
        downloaded = tmp_path / "hf-home/hub/models--cxygpt-demo--qwen3-0.6b-support-lora"
        assert downloaded.is_dir() and os.listdir(downloaded / "snapshots")
        assert refused(load, c, "nope", "cxygpt-demo/not-a-repo") == (404, {
            "message": "Loading lora nope failed: No adapter found for cxygpt-demo/not-a-repo", "type": "NotFoundError",
            "param": None, "code": 404})
