"""HTTP routers, one per area."""
import orjson
from starlette.responses import Response


def json_response(data, status_code: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status_code, media_type="application/json")
