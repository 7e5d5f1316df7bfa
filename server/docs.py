"""API docs that work offline: ``/docs`` (Swagger UI) and ``/redoc``, plus bearer auth in the OpenAPI schema.

Decisions:
* The pages load their JS/CSS from the locked ``fastapi-offline`` package's static folder, mounted at
  :data:`DOCS_ASSETS` (``/docs/assets``), never from a CDN: a server without internet (or a browser that may
  not reach one) still gets working docs. The pages are FastAPI's own builders with local URLs (not
  ``FastAPIOffline``) so that they can carry a header: ReDoc without Google Fonts, and both pages with a
  Content-Security-Policy that allows only this server (:data:`DOCS_CSP`). ReDoc's sidebar hard-codes a logo
  from cdn.redoc.ly; the policy keeps the browser from fetching it (the image hides itself on error).
* The Gate (:mod:`.middleware`) owns which paths need no key; ``/docs``, ``/redoc``, ``/openapi.json`` and
  everything under ``/docs/assets/`` are public (static files from the package, nothing per tenant).
* Authentication is the Gate's job, not a FastAPI dependency, so routes declare nothing. The schema gets a
  ``bearer`` HTTP scheme and every non-public operation gets ``security: [{"bearer": []}]`` when the schema
  is first built (:func:`secure_openapi`); public paths come from the Gate's own list, so the lock icons
  cannot drift from what the server enforces. "Authorize" in Swagger UI then sends
  ``Authorization: Bearer <key>`` on "Try it out". No OAuth2 redirect page: there is no OAuth2 flow.
* The key is not persisted in the browser (no ``persistAuthorization``): the admin key must not outlive the tab.
* Request body examples live on the models (:mod:`.schemas`); the upload body is raw bytes or multipart,
  declared in :mod:`.uploads`, so its examples (curl lines, a multipart ``labels`` value) are added here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from .middleware import DOCS_ASSETS, PUBLIC_PATHS

ASSETS_DIR = Path(fastapi_offline.__file__).parent / "static"  # swagger-ui-bundle.js, swagger-ui.css, redoc...
# inline script/style: Swagger's init script, ReDoc's styled-components; blob: workers: ReDoc's search index
DOCS_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; font-src 'self' data:; worker-src 'self' blob:; connect-src 'self'; "
    "object-src 'none'; base-uri 'self'; frame-ancestors 'self'"
)
BEARER = "bearer"
SECURITY_SCHEME: dict[str, Any] = {
    "type": "http",
    "scheme": "bearer",
    "description": "An API key. Tenant key: `/v1/prefixes`, `/v1/classify`. Admin key: `/v1/tenants` "
    "and `/metrics` (which also takes the metrics token). Get a tenant key from `POST /v1/tenants` "
    "(admin) or `prefixserve tenant create NAME`.",
}
# FastAPI's defaults (layout, deep links) plus: show how long each "Try it out" took
SWAGGER_UI: dict[str, Any] = {"displayRequestDuration": True}

_UPLOAD = ("/v1/prefixes/{prefix_id}", "put")
UPLOAD_DESCRIPTION = (
    "A packed adapter (`prefixserve pack` or the trainer writes one):\n\n"
    '    curl -X PUT -H "Authorization: Bearer $KEY" -H "Content-Type: application/octet-stream" \\\n'
    "         --data-binary @sentiment.safetensors http://127.0.0.1:8000/v1/prefixes/sentiment\n\n"
    "or a PEFT folder's two files as multipart:\n\n"
    '    curl -X PUT -H "Authorization: Bearer $KEY" -F adapter_config=@out/adapter_config.json \\\n'
    '         -F adapter_model=@out/adapter_model.safetensors -F \'labels=["neg", "pos"]\' \\\n'
    "         http://127.0.0.1:8000/v1/prefixes/sentiment"
)
UPLOAD_MULTIPART_EXAMPLE = {"labels": '["neg", "pos"]'}


def offline_app(**kwargs: Any) -> FastAPI:
    """``FastAPI(**kwargs)`` with offline ``/docs`` and ``/redoc`` and bearer auth in its schema."""
    app = FastAPI(docs_url=None, redoc_url=None, swagger_ui_parameters=SWAGGER_UI, **kwargs)
    install_docs(app)
    secure_openapi(app)
    return app


def install_docs(app: FastAPI, docs_url: str = "/docs", redoc_url: str = "/redoc") -> None:
    """The two pages and their assets (URLs under the request's ``root_path``: a Serve route prefix)."""
    app.mount(DOCS_ASSETS, StaticFiles(directory=ASSETS_DIR), name="docs-assets")
    assert app.openapi_url is not None
    openapi_url = app.openapi_url

    @app.get(docs_url, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        page = get_swagger_ui_html(
            openapi_url=root + openapi_url,
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{root}{DOCS_ASSETS}/favicon.png",
            swagger_ui_parameters=app.swagger_ui_parameters,
        )
        page.headers["Content-Security-Policy"] = DOCS_CSP
        return page

    @app.get(redoc_url, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        page = get_redoc_html(
            openapi_url=root + openapi_url,
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{DOCS_ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{DOCS_ASSETS}/favicon.png",
            with_google_fonts=False,
        )
        page.headers["Content-Security-Policy"] = DOCS_CSP
        return page


def secure_openapi(app: FastAPI, public_paths: frozenset[str] = PUBLIC_PATHS) -> None:
    """Make ``app.openapi()`` declare the bearer scheme on every operation outside ``public_paths``."""
    build: Callable[[], dict[str, Any]] = app.openapi  # FastAPI's own, which caches in app.openapi_schema

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            add_security(build(), public_paths)  # FastAPI cached this very dict: edited once, in place
        assert app.openapi_schema is not None
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def add_security(schema: dict[str, Any], public_paths: frozenset[str]) -> dict[str, Any]:
    """The bearer scheme, its use on every non-public operation, and the upload body's examples."""
    schema.setdefault("components", {}).setdefault("securitySchemes", {})[BEARER] = SECURITY_SCHEME
    for path, operations in schema.get("paths", {}).items():
        if path in public_paths:
            continue
        for operation in operations.values():
            operation.setdefault("security", [{BEARER: []}])
    upload = schema.get("paths", {}).get(_UPLOAD[0], {}).get(_UPLOAD[1])
    if upload is not None and "requestBody" in upload:
        body = upload["requestBody"]
        body.setdefault("description", UPLOAD_DESCRIPTION)
        multipart = body.get("content", {}).get("multipart/form-data")
        if multipart is not None:
            multipart.setdefault("example", UPLOAD_MULTIPART_EXAMPLE)
    return schema
