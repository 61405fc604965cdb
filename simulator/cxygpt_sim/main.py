"""`cxygpt-sim [serve] MODEL [vLLM flags]`: log the derived setup and serve until SIGTERM."""
from __future__ import annotations

import asyncio
import logging
import sys
import time

from aiohttp import web

from .config import ConfigError, SimConfig, parse_config
from .server import create_app
from .weights import WeightsError, load

log = logging.getLogger("cxygpt_sim")


def describe(config: SimConfig) -> list[str]:
    return [
        f"serving {config.model} as {', '.join(config.served_model_names)} on {config.host}:{config.port}",
        f"max-model-len {config.max_model_len}, max-num-seqs {config.max_num_seqs}, max-num-batched-tokens "
        f"{config.max_num_batched_tokens}, prefix caching {'on' if config.enable_prefix_caching else 'off'}",
        f"KV budget {config.kv_tokens} tokens ({config.capacity.kv_blocks} blocks of {config.block_size}): "
        f"{config.kv_explanation}",
        f"speed profile {config.speed_profile}: {config.speed.describe()}, seed {config.seed}, text {config.text}",
    ]


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config, ignored = parse_config(sys.argv[1:] if argv is None else argv)
    except ConfigError as e:
        sys.exit(f"cxygpt-sim: error: {e}")
    if ignored:
        log.warning("ignoring vLLM flags the simulator does not model: %s", " ".join(ignored))
    for line in describe(config):
        log.info(line)
    try:  # as vLLM: the weights first (downloaded if need be), the API server after
        loaded = load(config.model, config.revision, config.load_gib_per_s)
    except WeightsError as e:
        sys.exit(f"cxygpt-sim: error: {e}")
    log.info(loaded.describe())
    if config.load_s:  # the rest of an engine's start (vLLM: CUDA graphs, warm-up), on top of the weights
        log.info("starting the engine: %g s before the server listens", config.load_s)
        time.sleep(config.load_s)
    try:
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass  # the standard loop is only slower
    # handler_cancellation: a client that disconnects cancels its handler, which frees the engine slot.
    # aiohttp reads a shutdown timeout of 0 as "wait forever"; vLLM's 0 means abort in-flight requests.
    web.run_app(create_app(config), host=config.host, port=config.port, access_log=None,
                handler_cancellation=True, shutdown_timeout=max(config.shutdown_timeout, 0.01), print=None)


if __name__ == "__main__":
    main()
