"""HTTP routers, one per area; each built from the few parts it reads."""
from collections.abc import Callable

import orjson
from starlette.requests import Request
from starlette.responses import Response

from ..admission.auth import Caller, KeyStore


def json_response(data, status_code: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status_code, media_type="application/json")


def authenticated(keys: KeyStore) -> Callable[[Request], Caller]:
    """The dependency of a read-only route (models, limits): its caller, or a 401."""
    def caller(request: Request) -> Caller:
        return keys.authenticate(request.headers.get("authorization"))
    return caller
