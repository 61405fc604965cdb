"""Single-user mode and forced profiles from the environment; fallback to an external provider with its key."""
from __future__ import annotations

import httpx
from test_gateway_support import start_gateway, start_sim

HI = {"messages": [{"role": "user", "content": "hi"}]}


def test_single_user_mode_from_the_environment(tmp_path):
    sim = start_sim(tmp_path, itl_ms=0)
    gateway = start_gateway(tmp_path, {"models": [{"name": "qwen3-14b", "url": sim.url, "profile": "DEV_32G"}]},
                            env={"SINGLE_USER": "1"})
    try:
        limits = httpx.get(gateway.url + "/v1/limits").json()
        assert (limits["single_user"], limits["rate_qps"], limits["rate_tpm"], limits["queue_size"]) == (
            True, None, None, 1)
        assert limits["max_output_tokens"] == 512  # the single-user output cap
        r = httpx.post(gateway.url + "/v1/chat/completions", json={"model": "qwen3-14b", **HI, "max_tokens": 5000})
        assert r.status_code == 200 and r.headers["x-cxygpt-max-tokens"] == "512"
    finally:
        gateway.stop()
        sim.stop()


def test_forced_profile_and_fallback_to_an_external_provider_when_the_model_is_down(tmp_path):
    provider = start_sim(tmp_path, "gpt-mini", itl_ms=0, extra_args=("--api-key", "sk-provider-secret"))
    (tmp_path / "provider-key").write_text("sk-provider-secret\n")  # as a mounted Secret
    gateway = start_gateway(tmp_path, {"models": [
        {"name": "local", "url": "http://127.0.0.1:9", "profile": "DEV_32G", "fallback": "cloud"},
        {"name": "cloud", "url": provider.url, "profile": "DEV_32G", "external": True, "upstream_model": "gpt-mini",
         "api_key_file": "provider-key"}]}, env={"FORCE_PROFILE": "SRV_80G"})
    try:
        limits = httpx.get(gateway.url + "/v1/limits", params={"model": "local"}).json()
        assert (limits["profile"], limits["max_input_tokens"]) == ("SRV_80G", 16128)
        assert limits["models"]["local"]["routable"] is False
        r = httpx.post(gateway.url + "/v1/chat/completions", json={"model": "local", **HI, "max_tokens": 3})
        assert r.status_code == 200, r.text
        assert (r.headers["x-cxygpt-model"], r.headers["x-cxygpt-fallback-from"]) == ("cloud", "local")
        assert r.json()["model"] == "gpt-mini"
        assert "sk-provider-secret" not in gateway.log_path.read_text()
    finally:
        gateway.stop()
        provider.stop()
