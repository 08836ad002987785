"""The pages: /v1/docs (Swagger UI from an installed package) and /ui (the dashboard, package
data); public also with auth on, every file they load served by the gateway itself."""
from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import pytest

from gateway import auth, pages
from gateway import config as configuration
from gateway.app import create_app

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
async def authed(aiohttp_client: Callable[..., Awaitable[Any]], tmp_path: Path) -> Any:
    document = {"gateway": {"state_dir": str(tmp_path / "state")},
                "auth": {"enabled": True, "tokens": [{"user": "alice", "sha256": auth.hash_token("jp_alice")}]}}
    return await aiohttp_client(create_app(configuration.from_document(document, tmp_path, "test config")))


def _loaded(html: str) -> list[str]:
    """The src and href values of a page's scripts and links (inline `data:` ones aside)."""
    return [ref for ref in re.findall(r'<(?:script|link)[^>]*\b(?:src|href)="([^"]+)"', html)
            if not ref.startswith("data:")]


@pytest.mark.parametrize("page", ["/v1/docs", "/ui"])
async def test_pages_and_what_they_load_are_public_and_local(authed: Any, page: str) -> None:
    response = await authed.get(page)
    assert response.status == 200 and response.content_type == "text/html"
    html = await response.text()
    loaded = _loaded(html)
    assert loaded, html
    for ref in loaded:
        assert "//" not in ref, f"{page} loads {ref} from elsewhere"
        asset = await authed.get(urljoin(page, ref))
        assert asset.status == 200, ref
        assert len(await asset.read()) > 0
    assert (await authed.get("/v1/jobproxy/state")).status == 401  # the API itself still needs a token


async def test_docs_render_the_served_openapi_document(authed: Any) -> None:
    script = await (await authed.get("/v1/docs/docs.js")).text()
    assert 'url: "openapi.json"' in script  # relative to /v1/docs: /v1/openapi.json
    assert (await authed.get(urljoin("/v1/docs", "openapi.json"))).status == 200
    bundle = await authed.get("/v1/docs/swagger-ui-bundle.js")
    assert bundle.content_type == "text/javascript" and b"SwaggerUIBundle" in await bundle.read()
    assert pages.swagger_ui_folder().joinpath("swagger-ui-bundle.js").is_file()


async def test_dashboard_runs_only_its_own_code(authed: Any) -> None:
    response = await authed.get("/ui")
    policy = response.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "connect-src 'self'" in policy and "default-src 'none'" in policy
    script = await (await authed.get("/ui/app.js")).text()
    assert "innerHTML" not in script  # text from the API is set as text only
    assert "localStorage" not in script and "sessionStorage" in script


def test_every_page_file_is_package_data() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'gateway = ["ui/*"]' in pyproject
    for path, _ in [*pages.DASHBOARD.values(), *pages.DOCS.values()]:
        assert path.parent == pages.UI and path.is_file()


def test_readme_links_the_pages() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "/v1/docs" in readme and "docs/dashboard.png" in readme and (ROOT / "docs" / "dashboard.png").is_file()


async def test_docs_without_swagger_ui_installed(aiohttp_client: Callable[..., Awaitable[Any]], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    def absent() -> Path:
        raise RuntimeError("the swagger-ui-py package is not installed: pip install swagger-ui-py")

    monkeypatch.setattr(pages, "swagger_ui_folder", absent)
    document = {"gateway": {"state_dir": str(tmp_path / "state")}}
    client = await aiohttp_client(create_app(configuration.from_document(document, tmp_path, "test config")))
    response = await client.get("/v1/docs/swagger-ui-bundle.js")
    assert response.status == 503 and "pip install swagger-ui-py" in (await response.json())["error"]
    assert (await client.get("/v1/jobproxy/ping")).status == 200
