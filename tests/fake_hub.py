"""A minimal local stand-in for the Hugging Face Hub's upload API (tests only).

It answers the calls ``HfApi.create_repo`` and ``HfApi.upload_folder`` make: repository
creation, the "preupload" query (every file is answered "regular", so contents arrive inline
in the commit) and the commit itself (NDJSON, base64 file contents). What arrived is kept in
``FakeHub.repos[repo_id][path] = bytes``; every request's path and Authorization header are
recorded. Anything else gets a 404, which makes the client raise: an unexpected call is visible.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeHub:
    def __init__(self):
        self.repos: dict[str, dict[str, bytes]] = {}
        self.requests: list[tuple[str, str, str | None]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                hub.requests.append(("POST", self.path, self.headers.get("Authorization")))
                handler = hub._route(self.path)
                if handler is None:
                    return self._reply(404, {"error": f"fake hub: no route for POST {self.path}"})
                self._reply(200, handler(self.path, body))

            def do_GET(self):
                hub.requests.append(("GET", self.path, self.headers.get("Authorization")))
                self._reply(404, {"error": f"fake hub: no route for GET {self.path}"})

            def _reply(self, status, payload):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def _route(self, path: str):
        path = path.split("?")[0]
        if path == "/api/repos/create":
            return self._create
        if path == "/api/validate-yaml":  # the model card's metadata check
            return lambda path, body: {"errors": [], "warnings": []}
        if path.startswith("/api/models/") and "/preupload/" in path:
            return self._preupload
        if path.startswith("/api/models/") and "/commit/" in path:
            return self._commit
        return None

    def _create(self, path, body):
        request = json.loads(body)
        namespace = request.get("organization") or "fake-user"  # the Hub fills in the caller's namespace
        repo_id = f"{namespace}/{request['name']}"
        self.repos.setdefault(repo_id, {})
        return {"url": f"{self.endpoint}/{repo_id}", "name": repo_id, "id": repo_id}

    def _preupload(self, path, body):
        files = json.loads(body)["files"]
        return {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}

    def _commit(self, path, body):
        repo_id = path.split("?")[0][len("/api/models/"):].split("/commit/")[0]
        store = self.repos.setdefault(repo_id, {})
        for line in body.splitlines():
            item = json.loads(line)
            if item["key"] == "file":
                store[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
        oid = hashlib.sha1(body).hexdigest()
        return {"commitUrl": f"{self.endpoint}/{repo_id}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None}
