# CxyGPT images: one target per component, built from the repository root (`make images` builds all):
#   docker build --target operator -t cxygpt/cxygpt-operator:0.1.0 .
#   docker build --target gateway  -t cxygpt/cxygpt-gateway:0.1.0 .
#   docker build --target sim      -t cxygpt/cxygpt-sim:0.1.0 .
#   docker build --target console  -t cxygpt/cxygpt-console:0.1.0 .
# Each installs only the packages its component imports, at the versions pyproject.toml pins. The base
# is pinned by tag; pin its digest too in a release pipeline: --build-arg BASE=python:3.11.13-slim-bookworm@sha256:…
ARG BASE=python:3.11.13-slim-bookworm

FROM ${BASE} AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml scripts/pick_deps.py ./
# the profile library (table, model facts, fit estimate) is part of every component
COPY profiles ./profiles

FROM builder AS operator-build
# huggingface-hub: the model cache's download Jobs run this image's cxygpt-cache-load
RUN python pick_deps.py kopf kubernetes pydantic pyyaml prometheus-client huggingface-hub > requirements.txt \
 && pip install -r requirements.txt
COPY operator ./operator
RUN pip install --no-deps .

FROM builder AS gateway-build
RUN python pick_deps.py fastapi uvicorn httptools uvloop pydantic pydantic-settings pyyaml aiohttp orjson \
    prometheus-client redis limits kubernetes > requirements.txt \
 && pip install -r requirements.txt
COPY gateway ./gateway
RUN pip install --no-deps .

FROM builder AS sim-build
# quicktok-v1 (the tokenizer, its vocabulary inside the wheel) brings numpy, its own requirement;
# huggingface-hub: an engine that downloads its weights itself (no model cache) does it as vLLM does
RUN python pick_deps.py aiohttp orjson uvloop prometheus-client pydantic pyyaml quicktok-v1 huggingface-hub \
    > requirements.txt \
 && pip install -r requirements.txt
COPY simulator ./simulator
RUN pip install --no-deps .

FROM builder AS console-build
# every page asset (templates, scripts, the vendored uPlot) is package data: nothing is fetched at run time
RUN python pick_deps.py fastapi uvicorn jinja2 itsdangerous aiohttp orjson prometheus-client kubernetes pyyaml limits \
    > requirements.txt \
 && pip install -r requirements.txt
COPY console ./console
RUN pip install --no-deps .

FROM ${BASE} AS runtime
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
RUN useradd --system --uid 10001 --user-group --no-create-home cxygpt
# numeric, so Kubernetes runAsNonRoot can verify it
USER 10001:10001

FROM runtime AS operator
COPY --from=operator-build /opt/venv /opt/venv
# 8080: kopf liveness (/healthz) · 8081: Prometheus /metrics
EXPOSE 8080 8081
ENTRYPOINT ["cxygpt-operator"]

FROM runtime AS gateway
COPY --from=gateway-build /opt/venv /opt/venv
EXPOSE 8080
ENTRYPOINT ["cxygpt-gateway"]
CMD ["--kubernetes", "--host", "0.0.0.0", "--port", "8080"]

FROM runtime AS sim
COPY --from=sim-build /opt/venv /opt/venv
EXPOSE 8000
ENTRYPOINT ["cxygpt-sim"]
CMD ["serve", "Qwen/Qwen3-0.6B", "--served-model-name", "qwen3-0.6b", "--host", "0.0.0.0", "--port", "8000", \
     "--max-model-len", "4096", "--max-num-seqs", "32"]

FROM runtime AS console
COPY --from=console-build /opt/venv /opt/venv
EXPOSE 8090
ENTRYPOINT ["cxygpt-console"]
CMD ["--host", "0.0.0.0", "--port", "8090", "--gateway-url", "http://cxygpt-gateway"]
