"""The HTTP servers that carry exchanges: uvicorn's protocol driven natively (uvicorn_native, the one module that
uses uvicorn's private interface), the plain ASGI app (asgi), and the connection bounds both keep (connections)."""
