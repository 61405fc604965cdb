# CxyGPT developer entry points. `make demo` runs the whole system locally (no root needed); `make test` runs every
# test (it also installs the test-only tools and servers).
VENV  ?= .venv
TOOLS ?= .tools
PY    := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(CURDIR)/$(TOOLS)/bin:$(PATH)

.PHONY: bootstrap bootstrap-test kube lint demo test test-unit test-openwebui screenshots profile clean

bootstrap:
	@scripts/bootstrap.sh

bootstrap-test:
	@scripts/bootstrap.sh --test

# the real control plane the tests run on (kube-apiserver, kube-controller-manager, kube-scheduler, etcd), built
# from their Go modules once per pinned version into $(TOOLS)/kube (devcluster/kube/go.mod pins them)
kube:
	@TOOLS=$(TOOLS) scripts/build_kube.sh

demo: bootstrap
	cxygpt-dev up

# ruff (pyflakes, pycodestyle, import order, bugbear, pyupgrade) and mypy over every package: pyproject.toml
lint: bootstrap-test
	$(VENV)/bin/ruff check
	$(VENV)/bin/mypy -p cxygpt_profiles -p cxygpt_operator -p cxygpt_gateway -p cxygpt_sim -p cxygpt_console

# two workers, each taking whole files (their module-scoped dev clusters stay in one process): half the time of
# one on 2 cores, since most tests wait on the servers and clusters they start
test: bootstrap-test kube lint
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=15

test-unit: bootstrap-test
	$(PY) -m pytest -q tests/unit

# Open WebUI's pip package chatting through the dev cluster's gateway. Not part of `make test`: the package brings
# torch with CUDA (about 7 GB and 6 minutes to install here); console/README.md, "Open WebUI"
OPENWEBUI_VERSION ?= 0.12.4
test-openwebui: bootstrap-test
	@[ -x $(TOOLS)/openwebui/bin/open-webui ] || { python3 -m venv $(TOOLS)/openwebui \
	  && $(TOOLS)/openwebui/bin/pip install -q --disable-pip-version-check open-webui==$(OPENWEBUI_VERSION); }
	OPEN_WEBUI=$(CURDIR)/$(TOOLS)/openwebui/bin/open-webui $(PY) -m pytest -q tests/e2e/test_openwebui.py

# The console's screenshots in docs/console/ (the README shows them), taken by its browser tests
screenshots: bootstrap-test
	CXYGPT_SCREENSHOTS_DIR=docs/console $(PY) -m pytest -q tests/e2e/test_console_browser.py

profile: bootstrap
	cxygpt-profile --gpu-memory 32GiB --mode single

clean:
	rm -rf $(VENV) $(TOOLS) .pytest_cache

# Container images of the operator, gateway, simulator and console, tagged with the chart's appVersion (needs a
# Docker engine; not part of `make test`). IMAGE_PREFIX=registry/org changes the repository prefix.
.PHONY: images
images:
	@command -v docker >/dev/null || { echo "make images: needs docker" >&2; exit 1; }
	@tag=$$(sed -n 's/^appVersion: *"*\([^"]*\)"*$$/\1/p' deploy/helm/cxygpt/Chart.yaml); \
	for target in operator gateway sim console; do \
	  docker build --target $$target -t $${IMAGE_PREFIX:-cxygpt}/cxygpt-$$target:$$tag . || exit 1; \
	done
