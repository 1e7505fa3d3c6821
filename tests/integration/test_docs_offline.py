"""``/docs`` works on a hub without internet: the page names only the hub's own paths (no
CDN), and each of them answers 200 with the content type a browser needs."""

from __future__ import annotations

import re
from html.parser import HTMLParser

from tests.support import Hub

TYPES = {".js": "javascript", ".css": "text/css", ".png": "image/png",
         ".json": "application/json"}


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.refs += [value for name, value in attrs if name in ("src", "href") and value]


def test_the_docs_page_loads_everything_from_the_hub(sqlite_hub: Hub) -> None:
    with sqlite_hub.client() as client:
        page = client.get("/docs")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        html = page.text
        parser = _Refs()
        parser.feed(html)
        # The page's script names the schema it loads too.
        refs = parser.refs + re.findall(r"url: '([^']+)'", html)
        assert len(refs) >= 4, refs  # stylesheet, icon, script, schema
        assert not re.search(r"https?://", html), html  # no other host, no CDN
        for ref in refs:
            assert ref.startswith("/"), ref
            got = client.get(ref)
            assert got.status_code == 200, (ref, got.status_code)
            suffix = ref[ref.rfind("."):]
            assert TYPES[suffix] in got.headers["content-type"], (ref, got.headers)
            assert got.content, ref
        script = client.get(next(r for r in refs if r.endswith(".js"))).text
        # The schema is OpenAPI 3.1, which only Swagger UI 5 renders (isOAS31 is its own).
        assert client.get("/openapi.json").json()["openapi"].startswith("3.1")
        assert "SwaggerUIBundle" in script and "isOAS31" in script
