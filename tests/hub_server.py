"""A local, in-memory server that speaks enough of the Hugging Face Hub API for our tests.

The real `huggingface_hub` client, diffusers' `from_pretrained` and the `ddpm-hf` CLI talk to it through
`HF_ENDPOINT` (or `HfApi(endpoint=...)`). It implements what they call to create a repo, commit files
(preupload, LFS batch with the basic transfer, commit), read repo info, trees and revisions, and resolve
files. Xet is not implemented: clients must run with `HF_HUB_DISABLE_XET=1`.

Like the Hub it keeps git-like history: every commit has a sha and a full file list, branches point at
commits, and old commits stay readable. Repos are public or private; tokens map to a user and a role.

Dataset repos are read-only: `server.add_dataset(repo_id, files)` puts one there, which `datasets` then reads
through the same info, tree, paths-info and resolve endpoints (under /api/datasets/ and /datasets/).

Test hooks:
    server.add_dataset(repo_id, {path: bytes})       a public dataset repo holding these files
    server.fail_next(n, status=503, path_prefix=...)  the next n matching requests fail with `status`
    server.pause(path_prefix)                         matching requests wait until the returned Event is set
    server.requests                                   every request: method, path, token
    server.uploads[repo_id]                           the paths each commit added, in order
    server.repo_files(repo_id, revision)              {path: bytes} of a revision
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

INVALID_TOKEN_MESSAGE = "Invalid credentials in Authorization header"

# What a fresh repo's first commit holds, as on the Hub.
GITATTRIBUTES = b"""*.bin filter=lfs diff=lfs merge=lfs -text
*.ckpt filter=lfs diff=lfs merge=lfs -text
*.png filter=lfs diff=lfs merge=lfs -text
*.pt filter=lfs diff=lfs merge=lfs -text
*.safetensors filter=lfs diff=lfs merge=lfs -text
"""
LFS_EXTENSIONS = (".bin", ".ckpt", ".png", ".jpg", ".pt", ".pth", ".safetensors", ".npy", ".npz", ".parquet")
LFS_MIN_SIZE = 10 * 1024 * 1024
_DATASET_PREFIX = "datasets/"  # dataset repos live in HubServer.repos under "datasets/<id>", model repos under "<id>"


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass
class StoredFile:
    blob_id: str  # git sha1 of what git stores: the content, or the LFS pointer
    size: int  # size of the content
    sha256: str | None = None  # set for LFS files: the content lives in the LFS store under it

    def tree_entry(self, path: str) -> dict:
        entry = {"type": "file", "oid": self.blob_id, "size": self.size, "path": path}
        if self.sha256 is not None:
            entry["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": len(lfs_pointer(self.sha256, self.size))}
        return entry


@dataclass
class Commit:
    sha: str
    parent: str | None
    title: str
    files: dict[str, StoredFile]
    date: str


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)


@dataclass
class RecordedRequest:
    method: str
    path: str
    token: str | None


@dataclass
class _Failure:
    remaining: int
    status: int
    path_prefix: str
    method: str | None


class HubError(Exception):
    def __init__(self, status: int, message: str, error_code: str | None = None, error_message: str | None = None, body: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.error_code, self.error_message, self.body = status, message, error_code, error_message, body


class HubServer:
    """In-memory Hub on 127.0.0.1. `tokens` maps a token to (user name, role), role "write" or "read"."""

    def __init__(self, tokens: dict[str, tuple[str, str]] | None = None, orgs: dict[str, set[str]] | None = None):
        self.tokens = dict(tokens or {})
        self.orgs = {name: set(members) for name, members in (orgs or {}).items()}
        self.repos: dict[str, Repo] = {}
        self.blobs: dict[str, bytes] = {}  # git sha1 -> content of regular files
        self.lfs: dict[str, bytes] = {}  # sha256 -> content of LFS files
        self.requests: list[RecordedRequest] = []
        self.uploads: dict[str, list[list[str]]] = {}
        self._failures: list[_Failure] = []
        self._pauses: list[tuple[str, threading.Event]] = []
        self._lock = threading.RLock()
        self._secret = secrets.token_bytes(16)
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle ------------------------------------------------------------------------------
    def start(self) -> HubServer:
        server = self

        class Handler(_Handler):
            hub = server

        self._httpd = _QuietServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        for _, event in self._pauses:
            event.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)
            self._httpd = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    # ---- test hooks -----------------------------------------------------------------------------
    def fail_next(self, n: int = 1, status: int = 503, path_prefix: str = "", method: str | None = None) -> None:
        """Answer the next `n` requests whose path starts with `path_prefix` (and of `method`, if given) with `status`."""
        with self._lock:
            self._failures.append(_Failure(n, status, path_prefix, method.upper() if method else None))

    def pause(self, path_prefix: str) -> threading.Event:
        """Hold requests whose path starts with `path_prefix` until the returned event is set."""
        event = threading.Event()
        with self._lock:
            self._pauses.append((path_prefix, event))
        return event

    def add_token(self, token: str, user: str, role: str = "write") -> None:
        self.tokens[token] = (user, role)

    def create_repo(self, repo_id: str, private: bool = False) -> None:
        """Create a repo directly (test setup), as `POST /api/repos/create` would."""
        with self._lock:
            self._create_repo(repo_id, private)

    def add_dataset(self, repo_id: str, files: dict[str, bytes]) -> None:
        """A public dataset repo holding `files` (test setup). Stored apart from model repos, as on the Hub."""
        with self._lock:
            repo = Repo(repo_id, private=False)
            stored = {}
            for path, content in {".gitattributes": GITATTRIBUTES, **files}.items():
                sha = git_blob_sha1(content)
                self.blobs[sha] = content
                stored[path] = StoredFile(sha, len(content))
            repo.branches["main"] = self._add_commit(repo, None, "initial commit", stored).sha
            self.repos[_DATASET_PREFIX + repo_id] = repo

    def repo_files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The content of every file of `repo_id` at `revision` (a branch or a commit sha)."""
        with self._lock:
            commit = self._resolve(self.repos[repo_id], revision)
            return {path: self._content(stored) for path, stored in commit.files.items()}

    def commit_shas(self, repo_id: str, branch: str = "main") -> list[str]:
        """Commit shas of `branch`, newest first."""
        with self._lock:
            repo = self.repos[repo_id]
            shas, sha = [], repo.branches[branch]
            while sha is not None:
                shas.append(sha)
                sha = repo.commits[sha].parent
            return shas

    def requests_to(self, path_prefix: str, method: str | None = None) -> list[RecordedRequest]:
        return [r for r in list(self.requests) if r.path.startswith(path_prefix) and (method is None or r.method == method)]

    # ---- state ----------------------------------------------------------------------------------
    def _create_repo(self, repo_id: str, private: bool) -> Repo:
        repo = Repo(repo_id, private)
        sha = git_blob_sha1(GITATTRIBUTES)
        self.blobs[sha] = GITATTRIBUTES
        self._add_commit(repo, None, "initial commit", {".gitattributes": StoredFile(sha, len(GITATTRIBUTES))})
        repo.branches["main"] = next(iter(repo.commits))
        self.repos[repo_id] = repo
        self.uploads.setdefault(repo_id, [])
        return repo

    def _add_commit(self, repo: Repo, parent: str | None, title: str, files: dict[str, StoredFile]) -> Commit:
        listing = json.dumps({p: f.blob_id for p, f in sorted(files.items())})
        sha = hashlib.sha1(f"{parent}\n{title}\n{listing}\n{time.time_ns()}".encode()).hexdigest()
        date = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
        commit = Commit(sha, parent, title, dict(files), date)
        repo.commits[sha] = commit
        return commit

    def _resolve(self, repo: Repo, revision: str) -> Commit:
        if revision in repo.branches:
            return repo.commits[repo.branches[revision]]
        if revision in repo.commits:
            return repo.commits[revision]
        raise HubError(404, f"Invalid rev id: {revision}", error_code="RevisionNotFound")

    def _content(self, stored: StoredFile) -> bytes:
        return self.lfs[stored.sha256] if stored.sha256 is not None else self.blobs[stored.blob_id]

    def _namespaces(self, user: str) -> set[str]:
        return {user} | {org for org, members in self.orgs.items() if user in members}

    def _sign(self, repo_id: str, oid: str) -> str:
        return hmac.new(self._secret, f"{repo_id}:{oid}".encode(), "sha256").hexdigest()


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        # A client that went away mid-request (a test killed it or interrupted it) is no server error.
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"
    timeout = 30

    def log_message(self, format, *args):  # keep test output quiet
        pass

    # ---- plumbing -------------------------------------------------------------------------------
    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type: str = "application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, value, headers: dict | None = None):
        self._send(status, json.dumps(value).encode(), headers)

    def _dispatch(self, method: str):
        url = urlsplit(self.path)
        path, query = url.path, parse_qs(url.query)
        auth = self.headers.get("Authorization", "")
        token = auth[len("Bearer ") :] if auth.startswith("Bearer ") else None
        hub = self.hub
        body = self._read_body() if method in ("POST", "PUT") else b""
        with hub._lock:
            hub.requests.append(RecordedRequest(method, path, token))
            failure = next((f for f in hub._failures if f.remaining > 0 and path.startswith(f.path_prefix) and f.method in (None, method)), None)
            if failure is not None:
                failure.remaining -= 1
            pauses = [event for prefix, event in hub._pauses if path.startswith(prefix)]
        for event in pauses:
            event.wait(timeout=60)
        try:
            if failure is not None:
                raise HubError(failure.status, f"injected failure {failure.status}")
            user = self._user(token)
            self._route(method, path, query, body, token, user)
        except HubError as e:
            headers = {}
            if e.error_code:
                headers["X-Error-Code"] = e.error_code
            if e.error_message:
                headers["X-Error-Message"] = e.error_message
            self._json(e.status, e.body or {"error": e.message}, headers)

    def _user(self, token: str | None) -> tuple[str, str] | None:
        if token is None:
            return None
        if token not in self.hub.tokens:
            raise HubError(401, INVALID_TOKEN_MESSAGE, error_message=INVALID_TOKEN_MESSAGE)
        return self.hub.tokens[token]

    # ---- routing --------------------------------------------------------------------------------
    def _route(self, method, path, query, body, token, user):
        parts = [unquote(p) for p in path.strip("/").split("/")]
        hub = self.hub
        if method == "GET" and path == "/api/whoami-v2":
            return self._whoami(user)
        if method == "POST" and path == "/api/repos/create":
            return self._create(json.loads(body or b"{}"), user)
        if method == "POST" and path == "/api/validate-yaml":
            return self._validate_yaml(json.loads(body or b"{}"))
        if method == "PUT" and parts[:1] == ["__lfs"] and len(parts) == 4:
            return self._lfs_put("/".join(parts[1:3]), parts[3], query, body)
        if parts[:1] == ["api"] and parts[1:2] in (["models"], ["datasets"]) and len(parts) >= 4:
            repo_id, rest = "/".join(parts[2:4]), parts[4:]
            with hub._lock:
                repo = self._repo(repo_id if parts[1] == "models" else _DATASET_PREFIX + repo_id, user)
                if method == "GET" and not rest:
                    return self._info(repo, "main")
                if method == "GET" and rest[:1] == ["revision"] and len(rest) >= 2:
                    return self._info(repo, "/".join(rest[1:]))
                if method == "GET" and rest[:1] == ["tree"] and len(rest) >= 2:
                    return self._tree(repo, rest[1], "/".join(rest[2:]), query)
                if method == "GET" and rest == ["refs"]:
                    branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": sha} for b, sha in repo.branches.items()]
                    return self._json(200, {"branches": branches, "tags": [], "converts": []})
                if method == "POST" and rest[:1] == ["paths-info"] and len(rest) >= 2:
                    return self._paths_info(repo, "/".join(rest[1:]), body)
                if method == "POST" and rest[:1] == ["preupload"] and len(rest) >= 2:
                    self._require_write(repo, user)
                    return self._preupload(repo, "/".join(rest[1:]), json.loads(body), query)
                if method == "POST" and rest[:1] == ["commit"] and len(rest) >= 2:
                    self._require_write(repo, user)
                    return self._commit(repo, "/".join(rest[1:]), body, query)
                if method == "POST" and rest[:1] == ["branch"] and len(rest) >= 2:
                    self._require_write(repo, user)
                    return self._branch(repo, "/".join(rest[1:]), json.loads(body or b"{}"))
        if method == "POST" and len(parts) == 6 and parts[1].endswith(".git") and parts[2:] == ["info", "lfs", "objects", "batch"]:
            repo_id = f"{parts[0]}/{parts[1][: -len('.git')]}"
            with hub._lock:
                repo = self._repo(repo_id, user)
                self._require_write(repo, user)
                return self._lfs_batch(repo, json.loads(body))
        if method in ("GET", "HEAD") and len(parts) >= 6 and parts[0] == "datasets" and parts[3] == "resolve":
            with hub._lock:
                repo = self._repo(_DATASET_PREFIX + "/".join(parts[1:3]), user)
                return self._resolve_file(repo, parts[4], "/".join(parts[5:]))
        if method in ("GET", "HEAD") and len(parts) >= 5 and parts[2] == "resolve":
            with hub._lock:
                repo = self._repo("/".join(parts[:2]), user)
                return self._resolve_file(repo, parts[3], "/".join(parts[4:]))
        raise HubError(404, f"no route for {method} {path} in the test Hub server")

    # ---- auth -----------------------------------------------------------------------------------
    def _repo(self, key: str, user) -> Repo:
        repo = self.hub.repos.get(key)
        if repo is not None and (not repo.private or (user is not None and repo.repo_id.split("/")[0] in self.hub._namespaces(user[0]))):
            return repo
        # The Hub does not tell a missing repo from one you may not see.
        if user is None:
            raise HubError(401, "Repository not found", error_code="RepoNotFound", error_message="Invalid username or password.")
        raise HubError(404, "Repository not found", error_code="RepoNotFound")

    def _require_write(self, repo: Repo, user) -> None:
        if user is None:
            raise HubError(401, "You must be authenticated to write to a repo", error_message="Invalid username or password.")
        name, role = user
        if repo.repo_id.split("/")[0] not in self.hub._namespaces(name) or role != "write":
            raise HubError(403, f"You don't have the rights to write to {repo.repo_id}")

    # ---- handlers -------------------------------------------------------------------------------
    def _whoami(self, user):
        if user is None:
            raise HubError(401, INVALID_TOKEN_MESSAGE, error_message=INVALID_TOKEN_MESSAGE)
        name, role = user
        orgs = [{"type": "org", "name": org, "roleInOrg": "write"} for org in sorted(self.hub._namespaces(name) - {name})]
        self._json(
            200,
            {
                "type": "user",
                "id": hashlib.sha1(name.encode()).hexdigest()[:24],
                "name": name,
                "fullname": name.title(),
                "orgs": orgs,
                "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": role}},
            },
        )

    def _create(self, payload: dict, user):
        if user is None:
            raise HubError(401, "You must be authenticated to create a repo", error_message="Invalid username or password.")
        name, role = user
        namespace = payload.get("organization") or name
        repo_name = payload.get("name") or ""
        if payload.get("type") not in (None, "model"):
            raise HubError(400, "the test Hub server only hosts model repos")
        if not repo_name or len(repo_name) > 96 or not all(c.isalnum() or c in "-_." for c in repo_name) or repo_name[0] in "-." or repo_name[-1] in "-.":
            raise HubError(400, f"Invalid repo name {repo_name!r}")
        if namespace not in self.hub._namespaces(name) or role != "write":
            raise HubError(403, f'You don\'t have the rights to create a model under the namespace "{namespace}"')
        repo_id = f"{namespace}/{repo_name}"
        url = f"{self.hub.url}/{repo_id}"
        with self.hub._lock:
            if repo_id in self.hub.repos:
                raise HubError(409, "You already created this model repo", body={"error": "You already created this model repo", "url": url})
            self.hub._create_repo(repo_id, payload.get("visibility") == "private")
        self._json(200, {"url": url, "name": repo_id, "id": hashlib.sha1(repo_id.encode()).hexdigest()[:24]})

    def _validate_yaml(self, payload: dict):
        content = payload.get("content", "")
        if content.startswith("---"):
            header = content.split("---", 2)[1]
            try:
                metadata = yaml.safe_load(header)
            except yaml.YAMLError as e:
                raise HubError(400, "Invalid YAML", body={"errors": [{"message": str(e)}]}) from None
            if metadata is not None and not isinstance(metadata, dict):
                raise HubError(400, "Invalid YAML", body={"errors": [{"message": "metadata must be a mapping"}]})
        self._json(200, {"errors": [], "warnings": []})

    def _info(self, repo: Repo, revision: str):
        commit = self.hub._resolve(repo, revision)
        self._json(
            200,
            {
                "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
                "id": repo.repo_id,
                "modelId": repo.repo_id,
                "author": repo.repo_id.split("/")[0],
                "sha": commit.sha,
                "lastModified": commit.date,
                "createdAt": commit.date,
                "private": repo.private,
                "gated": False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "siblings": [{"rfilename": p} for p in sorted(commit.files)],
            },
        )

    def _tree(self, repo: Repo, revision: str, prefix: str, query):
        commit = self.hub._resolve(repo, revision)
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        prefix = prefix.strip("/")
        entries, folders = [], set()
        for path, stored in sorted(commit.files.items()):
            if prefix and not path.startswith(prefix + "/"):
                continue
            relative = path[len(prefix) + 1 :] if prefix else path
            pieces = relative.split("/")
            for depth in range(1, len(pieces)):
                folder = "/".join(([prefix] if prefix else []) + pieces[:depth])
                if (recursive or depth == 1) and folder not in folders:
                    folders.add(folder)
                    entries.append({"type": "directory", "oid": hashlib.sha1(folder.encode()).hexdigest(), "size": 0, "path": folder})
            if recursive or len(pieces) == 1:
                entries.append(stored.tree_entry(path))
        if prefix and not entries:
            raise HubError(404, f"{prefix} does not exist", error_code="EntryNotFound")
        self._json(200, entries)

    def _paths_info(self, repo: Repo, revision: str, body: bytes):
        commit = self.hub._resolve(repo, revision)
        form = parse_qs(body.decode())
        result = []
        for path in form.get("paths", []):
            if path in commit.files:
                result.append(commit.files[path].tree_entry(path))
            elif any(p.startswith(path.rstrip("/") + "/") for p in commit.files):
                result.append({"type": "directory", "oid": hashlib.sha1(path.encode()).hexdigest(), "size": 0, "path": path})
        self._json(200, result)

    def _preupload(self, repo: Repo, revision: str, payload: dict, query):
        if query.get("create_pr"):
            raise HubError(400, "the test Hub server does not support pull requests")
        commit = self.hub._resolve(repo, revision)
        files = []
        for item in payload.get("files", []):
            path, size = item["path"], item["size"]
            sample = base64.b64decode(item.get("sample", ""))
            lfs = path.endswith(LFS_EXTENSIONS) or size >= LFS_MIN_SIZE or b"\0" in sample
            info = {"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False}
            existing = commit.files.get(path)
            if existing is not None:
                info["oid"] = existing.sha256 if existing.sha256 is not None else existing.blob_id
            files.append(info)
        self._json(200, {"files": files, "commitOid": commit.sha})

    def _lfs_batch(self, repo: Repo, payload: dict):
        if payload.get("operation") != "upload":
            raise HubError(400, "the test Hub server only supports LFS uploads")
        if "basic" not in payload.get("transfers", ["basic"]):
            raise HubError(400, "the test Hub server only supports the basic LFS transfer")
        objects = []
        for obj in payload.get("objects", []):
            oid, size = obj["oid"], obj["size"]
            entry = {"oid": oid, "size": size, "authenticated": True}
            if oid not in self.hub.lfs:
                href = f"{self.hub.url}/__lfs/{repo.repo_id}/{oid}?size={size}&sig={self.hub._sign(repo.repo_id, oid)}"
                entry["actions"] = {"upload": {"href": href, "header": {}}}
            objects.append(entry)
        self._json(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}, headers={"Content-Type": "application/vnd.git-lfs+json"})

    def _lfs_put(self, repo_id: str, oid: str, query, body: bytes):
        # Like a pre-signed S3 URL: no Authorization header, the signature authorises the upload.
        if not hmac.compare_digest(query.get("sig", [""])[0], self.hub._sign(repo_id, oid)):
            raise HubError(403, "bad upload signature")
        if hashlib.sha256(body).hexdigest() != oid or len(body) != int(query.get("size", ["-1"])[0]):
            raise HubError(400, "uploaded content does not match its oid or size")
        with self.hub._lock:
            self.hub.lfs[oid] = body
        self._send(200, b"", content_type="text/plain")

    def _commit(self, repo: Repo, revision: str, body: bytes, query):
        if query.get("create_pr"):
            raise HubError(400, "the test Hub server does not support pull requests")
        if revision not in repo.branches:
            raise HubError(404, f"Invalid rev id: {revision}", error_code="RevisionNotFound")
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "a commit starts with a header line")
        header = lines[0]["value"]
        head = repo.commits[repo.branches[revision]]
        if header.get("parentCommit") not in (None, head.sha):
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(head.files)
        added = []
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            path = value["path"]
            if key == "file":
                content = base64.b64decode(value["content"])
                sha = git_blob_sha1(content)
                self.hub.blobs[sha] = content
                files[path] = StoredFile(sha, len(content))
                added.append(path)
            elif key == "lfsFile":
                oid = value["oid"]
                if oid not in self.hub.lfs:
                    raise HubError(422, f"Your push was rejected because an LFS pointer pointed to a file that does not exist: {path}")
                size = len(self.hub.lfs[oid])
                files[path] = StoredFile(git_blob_sha1(lfs_pointer(oid, size)), size, oid)
                added.append(path)
            elif key == "deletedFile":
                if path not in files:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", error_code="EntryNotFound")
                del files[path]
            elif key == "deletedFolder":
                prefix = path.rstrip("/") + "/"
                for existing in [p for p in files if p.startswith(prefix)]:
                    del files[existing]
            else:
                raise HubError(400, f"unknown commit operation {key!r}")
        commit = self.hub._add_commit(repo, head.sha, header.get("summary", ""), files)
        repo.branches[revision] = commit.sha
        self.hub.uploads[repo.repo_id].append(added)
        self._json(200, {"success": True, "commitOid": commit.sha, "commitUrl": f"{self.hub.url}/{repo.repo_id}/commit/{commit.sha}", "pullRequestUrl": None})

    def _branch(self, repo: Repo, branch: str, payload: dict):
        if branch in repo.branches:
            raise HubError(409, f"Reference already exists: refs/heads/{branch}")
        start = self.hub._resolve(repo, payload.get("startingPoint") or "main")
        repo.branches[branch] = start.sha
        self._json(200, {})

    def _resolve_file(self, repo: Repo, revision: str, path: str):
        commit = self.hub._resolve(repo, revision)
        stored = commit.files.get(path)
        if stored is None:
            raise HubError(404, f"{path} does not exist at {revision}", error_code="EntryNotFound")
        headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{stored.blob_id}"', "Accept-Ranges": "none"}
        if stored.sha256 is not None:
            headers.update({"X-Linked-Etag": f'"{stored.sha256}"', "X-Linked-Size": str(stored.size)})
        self._send(200, self.hub._content(stored), headers, content_type="application/octet-stream")
