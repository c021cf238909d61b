"""A tiny fake Hugging Face Hub on 127.0.0.1 for push tests (point ``HF_ENDPOINT`` at ``server.url``).

It implements only what ``HfApi.create_repo`` / ``create_branch`` / ``upload_folder`` call for small files
(the regular, non-LFS upload path): repo creation, README YAML validation, preupload (answers "regular" for
every file), branch creation and the NDJSON commit. Every request is recorded; ``fail_next`` makes the next
calls of an endpoint answer an HTTP error first (to test retries); unknown endpoints answer 404 and are
recorded so a test sees what the client wanted.
"""

from __future__ import annotations

import base64
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_REPO = r"/api/models/(?P<repo>[^/]+/[^/]+)"
ROUTES = [
    ("create", re.compile(r"^/api/repos/create$")),
    ("validate_yaml", re.compile(r"^/api/validate-yaml$")),
    ("preupload", re.compile(_REPO + r"/preupload/(?P<rev>[^/?]+)")),
    ("commit", re.compile(_REPO + r"/commit/(?P<rev>[^/?]+)")),
    ("branch", re.compile(_REPO + r"/branch/(?P<rev>[^/?]+)")),
]


@dataclass
class FakeRepo:
    private: bool
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    commits: list[str] = field(default_factory=list)


@dataclass
class Request:
    method: str
    path: str
    endpoint: str
    authorization: str | None
    status: int


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.requests: list[Request] = []
        self._failures: dict[str, list[int]] = {}
        self._echo_auth = False
        self._lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server naming
                hub._handle(self)

            def do_GET(self) -> None:  # noqa: N802
                hub._handle(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()

    def fail_next(self, endpoint: str, *statuses: int, echo_auth: bool = False) -> None:
        """The next ``len(statuses)`` calls of ``endpoint`` answer these HTTP statuses. With ``echo_auth`` the
        error message quotes the request's Authorization header (a careless server), to test redaction."""
        self._failures.setdefault(endpoint, []).extend(statuses)
        self._echo_auth = echo_auth

    def calls(self, endpoint: str) -> list[Request]:
        return [r for r in self.requests if r.endpoint == endpoint]

    # -- request handling ------------------------------------------------------------------------------------
    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        path = h.path.split("?")[0]
        endpoint, match = "unknown", None
        for name, pattern in ROUTES:
            match = pattern.match(path)
            if match:
                endpoint = name
                break
        with self._lock:
            failures = self._failures.get(endpoint)
            if failures:
                status, payload = failures.pop(0), {"error": "injected failure"}
                if self._echo_auth:
                    payload["error"] += f" for {h.headers.get('Authorization')}"
            elif match is None:
                status, payload = 404, {"error": f"fake hub does not implement {h.command} {path}"}
            else:
                status, payload = getattr(self, f"_{endpoint}")(match, body)
            self.requests.append(Request(h.command, path, endpoint, h.headers.get("Authorization"), status))
        data = json.dumps(payload).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _create(self, match: re.Match[str], body: bytes) -> tuple[int, dict[str, Any]]:
        req = json.loads(body)
        repo_id = f"{req['organization']}/{req['name']}" if req.get("organization") else f"user/{req['name']}"
        if repo_id in self.repos:
            return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}
        private = req.get("visibility") == "private" or bool(req.get("private"))
        self.repos[repo_id] = FakeRepo(private=private)
        return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id, "id": repo_id}

    def _validate_yaml(self, match: re.Match[str], body: bytes) -> tuple[int, dict[str, Any]]:
        return 200, {"errors": [], "warnings": []}

    def _branch(self, match: re.Match[str], body: bytes) -> tuple[int, dict[str, Any]]:
        repo = self.repos.get(match["repo"])
        if repo is None:
            return 404, {"error": "Repository not found"}
        repo.branches.setdefault(match["rev"], dict(repo.branches["main"]))
        return 200, {}

    def _preupload(self, match: re.Match[str], body: bytes) -> tuple[int, dict[str, Any]]:
        if match["repo"] not in self.repos:
            return 404, {"error": "Repository not found"}
        files = json.loads(body)["files"]
        return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                               for f in files]}

    def _commit(self, match: re.Match[str], body: bytes) -> tuple[int, dict[str, Any]]:
        repo = self.repos.get(match["repo"])
        if repo is None:
            return 404, {"error": "Repository not found"}
        branch = repo.branches.get(match["rev"])
        if branch is None:
            return 404, {"error": f"Revision {match['rev']} not found"}
        for line in body.splitlines():
            item = json.loads(line)
            if item["key"] == "file":
                value = item["value"]
                if value.get("encoding") != "base64":
                    return 400, {"error": f"unexpected encoding {value.get('encoding')}"}
                branch[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] not in ("header", "deletedFile", "deletedFolder"):
                return 400, {"error": f"fake hub cannot commit {item['key']!r} (LFS?)"}
        oid = f"{len(repo.commits) + 1:040x}"
        repo.commits.append(oid)
        return 200, {"commitUrl": f"{self.url}/{match['repo']}/commit/{oid}", "commitOid": oid, "success": True}
