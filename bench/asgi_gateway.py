"""The gateway's ASGI app built from CXYGPT_GATEWAY_CONFIG, for servers given an import path (bench/servers.py)."""
import os

from cxygpt_gateway.app import create_app
from cxygpt_gateway.settings import load_settings

app = create_app(load_settings(os.environ["CXYGPT_GATEWAY_CONFIG"]))
