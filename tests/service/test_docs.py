"""`/docs` renders without internet: the page names no outside address, and the Swagger UI script
and styles it loads come from this server. It and the schema are open; the API is not."""

import re

import httpx


def test_docs_load_every_asset_from_the_server_itself(server):
    page = httpx.get(server.url + "/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    urls = re.findall(r"""(?:src|href|url)\s*[:=]\s*['"]([^'"]+)['"]""", page.text)
    assert urls, page.text
    assert [u for u in urls if re.match(r"(https?:)?//", u)] == []  # no CDN
    for url in urls:
        asset = httpx.get(server.url + url)
        assert asset.status_code == 200, url
    script = httpx.get(server.url + "/docs-assets/swagger-ui-bundle.js").text
    assert "SwaggerUIBundle" in script
    assert httpx.get(server.url + "/openapi.json").json()["info"]["title"] == "xatl"


def test_docs_are_open_but_the_api_is_not(server):
    assert httpx.get(server.url + "/docs").status_code == 200
    assert httpx.get(server.url + "/v1/models").status_code == 401
