"""A Hugging Face Hub stand-in on 127.0.0.1 for launch tests (HF_ENDPOINT points at it).

It answers the requests huggingface_hub 1.x makes for `hf_hub_download` / `snapshot_download` /
`repo_info`: HEAD and GET of `/{repo}/resolve/{revision}/{file}` (with the `X-Repo-Commit` and
`ETag` headers huggingface_hub requires, `X-Error-Code` on 404s so it raises its own typed errors) and
`/api/models/{repo}[/revision/{revision}]` (the commit sha and the file list), and
`/api/models/{repo}/tree/{revision}[/{path}]` (`list_repo_tree`). Every request is
recorded, so a test can say which files a launch fetched.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


class HubStandIn:
    """`repos`: {repo_id: {revision: checkpoint directory}}; "main" is the default branch. With
    `token`, every request must carry it (`Authorization: Bearer ...`), as for a private repo."""

    def __init__(self, repos: dict[str, dict[str, Path]], token: str | None = None,
                 deny_config_first: dict[str, int] | None = None):
        self.repos = {r: {rev: Path(d) for rev, d in revs.items()} for r, revs in repos.items()}
        self.token = token
        # repo -> how many of its first config.json requests are answered as the Hub answers a repo
        # the caller has no access to (a gated repo, a token not yet accepted): one fetch fails,
        # a later one succeeds.
        self.deny_config_first = dict(deny_config_first or {})
        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                hub._answer(self, body=False)

            def do_GET(self):
                hub._answer(self, body=True)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()

    @staticmethod
    def commit(repo: str, revision: str) -> str:
        return hashlib.sha1(f"{repo}@{revision}".encode()).hexdigest()

    def fetched_files(self) -> list[str]:
        """Files whose contents were requested (GET of a resolve URL), as `repo@revision/file`."""
        out = []
        for method, path in self.requests:
            parts = unquote(urlparse(path).path).strip("/").split("/")
            if method == "GET" and len(parts) >= 5 and parts[2] == "resolve":
                out.append(f"{parts[0]}/{parts[1]}@{parts[3]}/{'/'.join(parts[4:])}")
        return out

    def _revision_dir(self, repo: str, revision: str):
        revs = self.repos.get(repo)
        if revs is None:
            return None, "RepoNotFound"
        for rev, d in revs.items():
            if revision in (rev, self.commit(repo, rev)):
                return (rev, d), None
        return None, "RevisionNotFound"

    def _answer(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        self.requests.append((h.command, h.path))
        if self.token is not None and h.headers.get("Authorization") != f"Bearer {self.token}":
            # What the Hub answers for a private repo without access (huggingface_hub: RepositoryNotFoundError)
            return self._send(h, 401, b'{"error": "Invalid credentials"}',
                              {"X-Error-Code": "RepoNotFound", "Content-Type": "application/json"}, h.command == "GET")
        parts = unquote(urlparse(h.path).path).strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "tree":
            return self._tree(h, "/".join(parts[2:4]), parts[5], "/".join(parts[6:]), body)
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo = "/".join(parts[2:4])
            revision = parts[5] if len(parts) >= 6 and parts[4] == "revision" else "main"
            found, err = self._revision_dir(repo, revision)
            if found is None:
                return self._error(h, err, repo)
            rev, d = found
            files = sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())
            info = {"id": repo, "modelId": repo, "sha": self.commit(repo, rev), "private": False,
                    "siblings": [{"rfilename": f} for f in files]}
            return self._send(h, 200, json.dumps(info).encode(), {"Content-Type": "application/json"}, body)
        if len(parts) >= 5 and parts[2] == "resolve":
            repo, revision, filename = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
            if filename == "config.json" and self.deny_config_first.get(repo, 0) > 0:
                self.deny_config_first[repo] -= 1
                return self._send(h, 401, b'{"error": "Invalid credentials"}',
                                  {"X-Error-Code": "RepoNotFound", "Content-Type": "application/json"},
                                  h.command == "GET")
            found, err = self._revision_dir(repo, revision)
            if found is None:
                return self._error(h, err, repo)
            rev, d = found
            path = d / filename
            if not path.is_file():
                return self._error(h, "EntryNotFound", repo, commit=self.commit(repo, rev))
            data = path.read_bytes()
            headers = {"X-Repo-Commit": self.commit(repo, rev), "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                       "Content-Type": "application/octet-stream"}
            return self._send(h, 200, data, headers, body)
        return self._error(h, "RepoNotFound", "/".join(parts[:2]))

    def _tree(self, h, repo: str, revision: str, sub: str, body: bool) -> None:
        # `list_repo_tree` (transformers lists a repo's chat templates with it when loading a tokenizer)
        found, err = self._revision_dir(repo, revision)
        if found is None:
            return self._error(h, err, repo)
        base = found[1] / sub if sub else found[1]
        recursive = "recursive=true" in (urlparse(h.path).query or "").lower()
        entries = []
        for p in sorted(base.rglob("*") if recursive else base.iterdir()) if base.is_dir() else []:
            rel = str(p.relative_to(found[1]))
            if p.is_file():
                data = p.read_bytes()
                entries.append({"type": "file", "path": rel, "size": len(data), "oid": hashlib.sha1(data).hexdigest()})
            else:
                entries.append({"type": "directory", "path": rel, "oid": hashlib.sha1(rel.encode()).hexdigest()})
        self._send(h, 200, json.dumps(entries).encode(), {"Content-Type": "application/json"}, body)

    def _error(self, h, code: str, repo: str, commit: str | None = None) -> None:
        headers = {"X-Error-Code": code, "X-Error-Message": f"{code}: {repo}", "Content-Type": "application/json"}
        if commit:
            headers["X-Repo-Commit"] = commit
        self._send(h, 404, json.dumps({"error": code}).encode(), headers, h.command == "GET")

    @staticmethod
    def _send(h, status: int, data: bytes, headers: dict, body: bool) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if body:
            h.wfile.write(data)
