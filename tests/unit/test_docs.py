"""The Ingress's OpenAPI schema and docs pages without Ray: bearer scheme, examples that validate, local assets."""

from __future__ import annotations

import re
from typing import Any

import pytest
from pydantic import BaseModel
from starlette.testclient import TestClient

from prefixserve.server import state
from prefixserve.server.auth import Authenticator
from prefixserve.server.middleware import DOCS_ASSETS, PUBLIC_PATHS
from prefixserve.server.schemas import AppSettings, ClassifyRequest, LimitsIn, TenantCreate

# request body model per operation whose examples the docs show
BODIES: dict[tuple[str, str], type[BaseModel]] = {
    ("/v1/classify", "post"): ClassifyRequest,
    ("/v1/tenants", "post"): TenantCreate,
    ("/v1/tenants/{tenant}/limits", "put"): LimitsIn,
}


class NoTenants:
    def authenticate(self, key: str) -> str | None:
        return None


@pytest.fixture(scope="module")
def client() -> Any:
    from prefixserve.server import ingress  # the real app (routes bound by @serve.ingress; no cluster)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(state, "settings", AppSettings())
        mp.setattr(state, "auth", Authenticator(NoTenants(), "admin-key"))  # type: ignore[arg-type]
        with TestClient(ingress.app) as c:
            yield c


@pytest.fixture(scope="module")
def schema(client: TestClient) -> dict[str, Any]:
    r = client.get("/openapi.json")  # public: no key
    assert r.status_code == 200
    return r.json()


def test_bearer_scheme_on_every_keyed_operation(schema: dict[str, Any]) -> None:
    assert schema["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": schema["components"]["securitySchemes"]["bearer"]["description"],
    }
    keyed = 0
    for path, operations in schema["paths"].items():
        for method, op in operations.items():
            if path in PUBLIC_PATHS:
                assert "security" not in op, (method, path)
            else:
                assert op["security"] == [{"bearer": []}], (method, path)
                keyed += 1
    assert keyed >= 10


@pytest.mark.parametrize("route", sorted(BODIES), ids=lambda r: f"{r[1]} {r[0]}")
def test_body_examples_validate_against_their_model(schema: dict[str, Any], route: tuple[str, str]) -> None:
    model = BODIES[route]
    ref = schema["paths"][route[0]][route[1]]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert ref == f"#/components/schemas/{model.__name__}"
    examples = schema["components"]["schemas"][model.__name__]["examples"]
    assert examples
    for example in examples:
        model.model_validate(example)  # raises when an example drifts from its model


def test_upload_body_documents_both_encodings(schema: dict[str, Any]) -> None:
    body = schema["paths"]["/v1/prefixes/{prefix_id}"]["put"]["requestBody"]
    assert "application/octet-stream" in body["description"] and "adapter_config=@" in body["description"]
    multipart = body["content"]["multipart/form-data"]
    assert set(multipart["example"]) <= set(multipart["schema"]["properties"])


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_pages_load_only_local_assets(client: TestClient, page: str) -> None:
    r = client.get(page)
    assert r.status_code == 200
    assert "default-src 'self'" in r.headers["content-security-policy"]
    urls = re.findall(r'(?:src|href)="([^"]+)"', r.text)
    assert urls and all(u.startswith(DOCS_ASSETS + "/") for u in urls), urls
    assert "https://" not in r.text
    for url in urls:
        assert client.get(url).status_code == 200, url  # assets need no key


def test_assets_are_public_the_api_is_not(client: TestClient) -> None:
    assert client.get(f"{DOCS_ASSETS}/missing.js").status_code == 404
    r = client.get("/v1/prefixes")
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    assert client.get("/docs/not-assets").status_code == 401
