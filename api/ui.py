"""The dashboard: `GET /ui`, one self-contained HTML page shipped in the
package (api/static/ui.html: no CDN, no build step). It polls /v1/cluster and
/v1/tensors of the replica that served it; see docs/operations.md."""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

from fastapi import APIRouter
from starlette.responses import HTMLResponse, Response

router = APIRouter()


@lru_cache(maxsize=1)
def page() -> str:
    return resources.files("api").joinpath("static", "ui.html").read_text(encoding="utf-8")


@router.get("/ui", include_in_schema=False)
async def ui() -> HTMLResponse:
    return HTMLResponse(
        page(),
        headers={
            "Cache-Control": "no-cache",
            "Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'",
        },
    )


@router.get("/favicon.ico", include_in_schema=False)
async def favicon() -> Response:
    """No icon, and no 404 on the console of every browser that opens /ui."""
    return Response(status_code=204)
