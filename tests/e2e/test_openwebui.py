"""Open WebUI (its pip package, as a user installs it) chatting through the dev cluster's gateway. Opt-in: `make
test-openwebui` installs it (about 6 minutes and 7 GB: torch with CUDA comes with it) into .tools/openwebui; `make
test` skips this, the console's playground being the suite's chat UI (console/README.md says why)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest
from test_devcluster import Dev, sim_md

from harness import REPO, ServerProcess, free_port, wait_until

OPEN_WEBUI = Path(os.environ.get("OPEN_WEBUI", REPO / ".tools" / "openwebui" / "bin" / "open-webui"))
pytestmark = [pytest.mark.timeout(300),
              pytest.mark.skipif(not OPEN_WEBUI.exists(), reason="Open WebUI is not installed (make test-openwebui)")]
MODEL = "webui-model"


def test_open_webui_chats_through_the_gateway(tmp_path):
    dev = Dev(tmp_path)
    webui = None
    try:
        dev.apply(sim_md(MODEL, MODEL))
        dev.wait_phase(MODEL)
        wait_until(lambda: MODEL in dev.models(), timeout=30, what="the model routed")
        port = free_port()
        # as the chart configures it (templates/openwebui/deployment.yaml), offline and without its own accounts
        env = {"OPENAI_API_BASE_URL": dev.gateway + "/v1", "OPENAI_API_KEY": "none", "ENABLE_OLLAMA_API": "false",
               "WEBUI_AUTH": "False", "WEBUI_SECRET_KEY": "test", "DATA_DIR": str(tmp_path / "webui"),
               "OFFLINE_MODE": "true", "HF_HUB_OFFLINE": "1", "ANONYMIZED_TELEMETRY": "false"}
        (tmp_path / "webui").mkdir()
        webui = ServerProcess([str(OPEN_WEBUI), "serve", "--host", "127.0.0.1", "--port", str(port)], port=port,
                              health="/health", env=env, ready_timeout=180, log_path=tmp_path / "webui.log").start()
        token = httpx.post(webui.url + "/api/v1/auths/signin", json={"email": "", "password": ""},
                           timeout=30).json()["token"]
        auth = {"Authorization": f"Bearer {token}"}
        models = httpx.get(webui.url + "/api/models", headers=auth, timeout=30).json()["data"]
        assert MODEL in {m["id"] for m in models}
        before = requests_served(dev.gateway)
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Hello through Open WebUI"}]}
        reply = httpx.post(webui.url + "/api/chat/completions", headers=auth, json={**body, "stream": False},
                           timeout=60).json()
        assert reply["choices"][0]["message"]["content"]
        with httpx.stream("POST", webui.url + "/api/chat/completions", headers=auth, json={**body, "stream": True},
                          timeout=60) as r:
            chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))
        assert requests_served(dev.gateway) >= before + 2  # both went through the gateway
    finally:
        if webui is not None:
            webui.stop()
        dev.stop()


def requests_served(gateway: str) -> float:
    text = httpx.get(gateway + "/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("cxygpt_gateway_requests_total{") and f'model="{MODEL}"' in line and 'code="200"' in line)
