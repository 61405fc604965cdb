"""servers/uvicorn_native.py drives uvicorn's private httptools request-cycle interface: this fails loudly, naming what
moved, when an upgrade breaks that contract (the public alternatives are measured by bench/servers.py: BENCHMARKS.md)."""
import inspect
import re

import uvicorn
from uvicorn.protocols.http import httptools_impl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from cxygpt_gateway.servers.uvicorn_native import GatewayHttpProtocol, NativeExchange

WHY = ("the gateway's servers/uvicorn_native.py carries the relayed POSTs on uvicorn's httptools protocol through its "
       "private request-cycle interface; re-check it against this uvicorn (and re-run bench/servers.py) before moving "
       "the pin in pyproject.toml")

# what GatewayHttpProtocol and NativeExchange use of the protocol they extend
PROTOCOL_METHODS = ("connection_made", "connection_lost", "on_headers_complete", "on_body", "on_message_complete",
                    "on_response_complete", "_start_asgi_task")
PROTOCOL_STATE = ("config", "loop", "transport", "flow", "parser", "url", "headers", "cycle", "pipeline",
                  "expect_100_continue")


def test_the_pinned_uvicorn_is_the_one_installed():
    assert uvicorn.__version__.startswith("0.54."), f"uvicorn {uvicorn.__version__}: {WHY}"


def test_the_protocol_has_what_the_gateway_drives():
    source = inspect.getsource(HttpToolsProtocol)
    missing = [m for m in PROTOCOL_METHODS if not callable(getattr(HttpToolsProtocol, m, None))]
    missing += [a for a in PROTOCOL_STATE if not re.search(rf"self\.{a}\b\s*(:[^=]*)?=", source)]
    assert not missing, f"uvicorn {uvicorn.__version__} HttpToolsProtocol lacks {missing}: {WHY}"
    assert httptools_impl.STATUS_LINE[200].startswith(b"HTTP/1.1 200"), WHY
    assert issubclass(GatewayHttpProtocol, HttpToolsProtocol)


def test_every_cycle_attribute_the_protocol_touches_is_one_the_exchange_has():
    """The exchange stands in for uvicorn's RequestResponseCycle: whatever the protocol reads or writes on its
    cycle (self.cycle.X, cycle.X, existing_cycle.X) must exist on the exchange."""
    source = inspect.getsource(HttpToolsProtocol)
    touched = set(re.findall(r"\b(?:self\.cycle|cycle|existing_cycle)\.([a-z_]+)", source))
    has = {name for cls in NativeExchange.__mro__ for name in getattr(cls, "__slots__", ())}
    has |= {name for name, _ in inspect.getmembers(NativeExchange)}
    assert touched, "found no cycle attributes in uvicorn's protocol: the pattern no longer matches its source"
    assert touched <= has, f"uvicorn {uvicorn.__version__} touches {sorted(touched - has)} on its cycle: {WHY}"
