#!/usr/bin/env bash
# Install the benchmark peers, each in its own venv under .bench-venvs/ (LiteLLM proxy, vllm-router), granian
# into the project's venv (bench/servers.py), and wrk when apt can provide it. A peer that fails to install is
# reported and skipped by the suite.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p .bench-venvs
install() {  # name, pip requirement, command that must exist afterwards
    local name=$1 req=$2 cmd=$3
    if [ -x ".bench-venvs/$name/bin/$cmd" ]; then echo "$name: already installed"; return 0; fi
    "$PY" -m venv ".bench-venvs/$name" && ".bench-venvs/$name/bin/pip" install -q --upgrade pip &&
        ".bench-venvs/$name/bin/pip" install -q "$req" && [ -x ".bench-venvs/$name/bin/$cmd" ] &&
        echo "$name: installed ($(".bench-venvs/$name/bin/pip" show "${req%%[*}" 2>/dev/null | sed -n 's/^Version: //p'))" ||
        echo "$name: NOT installed (the suite will skip it)"
}
install litellm 'litellm[proxy]' litellm
install vllm-router vllm-router vllm-router
# granian serves the gateway's own app in bench/servers.py, so it goes into the project's venv (a bench extra)
.venv/bin/pip install -q -e '.[bench]' >/dev/null 2>&1 && echo "granian: $(.venv/bin/pip show granian | sed -n 's/^Version: //p')" ||
    echo "granian: NOT installed (bench/servers.py cannot run its granian variants)"
if ! command -v wrk >/dev/null; then
    if [ "$(id -u)" = 0 ]; then apt-get install -y -q wrk >/dev/null 2>&1; else sudo -n apt-get install -y -q wrk >/dev/null 2>&1; fi
fi
command -v wrk >/dev/null && echo "wrk: $(command -v wrk)" || echo "wrk: NOT installed (non-streaming points use cxygpt-bench)"
