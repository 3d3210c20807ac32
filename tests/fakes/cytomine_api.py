"""A fake Cytomine server on 127.0.0.1: the REST calls cytomine-python-client makes, with its HMAC key check."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

from fakes.archives import png
from fakes.http_files import serve

PUBLIC, PRIVATE = "pub-key", "priv-key"


@dataclass
class FakeCytomine:
    """One project (id 42, name `ulb_anapath_lba`) with terms, slides and single-term annotations."""

    terms: dict[int, str] = field(default_factory=lambda: {101: "lymphocyte", 102: "macrophage", 103: "neutrophil"})
    slides: int = 6
    per_slide: int = 6
    corrupt: set[int] = field(default_factory=set)  # annotation ids whose crop comes back truncated
    failing: set[int] = field(default_factory=set)  # annotation ids whose crop answers HTTP 500
    crop_hits: Counter[int] = field(default_factory=Counter)
    crop_params: list[dict[str, list[str]]] = field(default_factory=list)
    base: str = ""

    def images(self) -> list[dict[str, Any]]:
        return [{"id": 500 + s, "instanceFilename": f"slide-{s}.svs", "project": 42} for s in range(self.slides)]

    def annotations(self) -> list[dict[str, Any]]:
        term_ids = sorted(self.terms)
        if not term_ids:
            return []
        out = []
        for s in range(self.slides):
            for k in range(self.per_slide):
                aid = 9000 + s * 100 + k
                out.append(
                    {
                        "id": aid,
                        "image": 500 + s,
                        "project": 42,
                        "term": [term_ids[(s + k) % len(term_ids)]],
                        "cropURL": f"{self.base}/api/userannotation/{aid}/crop.png",
                    }
                )
        # one unlabelled and one ambiguous annotation: the pull must skip both
        out.append(
            {"id": 1, "image": 500, "project": 42, "term": [], "cropURL": f"{self.base}/api/userannotation/1/crop.png"}
        )
        out.append(
            {
                "id": 2,
                "image": 500,
                "project": 42,
                "term": term_ids[:2],
                "cropURL": f"{self.base}/api/userannotation/2/crop.png",
            }
        )
        return out

    def answer(self, path: str, query: dict[str, list[str]]) -> tuple[int, Any]:
        """(status, JSON body or PNG bytes) for one authenticated GET."""

        def collection(items: list[Any]) -> tuple[int, Any]:
            return 200, {"collection": items, "size": len(items)}

        project = {"id": 42, "name": "ulb_anapath_lba", "ontology": 7}
        if path == "/api/user/current.json":
            return 200, {"id": 3, "username": "tester", "publicKey": PUBLIC}
        if path == "/api/project.json":
            return collection([project])
        if path == "/api/project/42.json":
            return 200, project
        if path == "/api/project/42/term.json":
            return collection([{"id": t, "name": n, "ontology": 7} for t, n in self.terms.items()])
        if path == "/api/project/42/imageinstance.json":
            return collection(self.images())
        if path == "/api/annotation.json":
            wanted = {int(t) for t in query.get("terms", [""])[0].split(",") if t}
            items = [a for a in self.annotations() if str(a["project"]) == query.get("project", [""])[0]]
            return collection([a for a in items if not wanted or set(a["term"]) & wanted])
        match = re.fullmatch(r"/api/userannotation/(\d+)/crop\.png", path)
        if match:
            aid = int(match.group(1))
            self.crop_hits[aid] += 1
            self.crop_params.append(query)
            if aid in self.failing:
                return 500, {"errors": "image server down"}
            data = png(aid % 7, (24 + aid % 5, 20), aid)
            return 200, data[: len(data) // 2] if aid in self.corrupt else data
        return 404, {"errors": f"no route {path}"}

    @contextlib.contextmanager
    def running(self) -> Iterator[str]:
        """Serve on 127.0.0.1; yields the host URL."""
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _send(self, status: int, body: Any) -> None:
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "image/png" if isinstance(body, bytes) else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _signed(self) -> bool:
                token = f"GET\n\n{self.headers.get('content-type', '')}\n{self.headers.get('date', '')}"
                digest = hmac.new(PRIVATE.encode(), token.encode(), hashlib.sha1).digest()
                return self.headers.get("authorization") == f"CYTOMINE {PUBLIC}:{base64.b64encode(digest).decode()}"

            def do_GET(self) -> None:  # noqa: N802
                url = urlsplit(self.path)
                if url.path == "/server/ping":
                    return self._send(200, {"alive": True})
                if not self._signed():
                    return self._send(401, {"errors": "Auth failed"})
                return self._send(*owner.answer(url.path, parse_qs(url.query)))

        with serve(Handler) as base:
            self.base = base
            yield base
