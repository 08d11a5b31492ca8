"""The playground page, its monitoring page and its static files (not part of the OpenAPI schema)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse, HTMLResponse

from lmcore.serve.limits import ApiError
from lmcore.serve.monitor_page import monitor_html
from lmcore.serve.state import ServeState, get_state

STATIC = Path(__file__).resolve().parent.parent / "static"

router = APIRouter()


@router.get("/", include_in_schema=False)
async def playground():
    return FileResponse(STATIC / "index.html", media_type="text/html")


@router.get("/monitor", include_in_schema=False)
def monitor(state: ServeState = Depends(get_state)):
    """Ratings, latency and drift charts; a plain ``def``: FastAPI renders it on a worker thread."""
    return HTMLResponse(monitor_html(state))


@router.get("/static/{name}", include_in_schema=False)
async def static(name: str):
    path = (STATIC / name).resolve()
    if path.parent != STATIC.resolve() or not path.is_file():
        raise ApiError(404, "not_found", "name", f"no static file {name!r}")
    return FileResponse(path)
