# CxyGPT developer entry points. `make demo` runs the whole system locally; `make test` runs every test.
VENV  ?= .venv
TOOLS ?= .tools
PY    := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(CURDIR)/$(TOOLS)/bin:$(PATH)

.PHONY: bootstrap demo test test-unit profile clean

bootstrap:
	@scripts/bootstrap.sh

demo: bootstrap
	cxygpt-dev up

test: bootstrap
	$(PY) -m pytest -q

test-unit: bootstrap
	$(PY) -m pytest -q tests/unit

profile: bootstrap
	cxygpt-profile --gpu-memory 32GiB --mode single

clean:
	rm -rf $(VENV) $(TOOLS) .pytest_cache
