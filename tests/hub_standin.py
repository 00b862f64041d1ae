"""A stand-in for the Hub's HTTP API on 127.0.0.1 that records what huggingface_hub sends (for HF_ENDPOINT).

It answers the calls `create_repo`, `create_branch` and `upload_folder` make (repo creation, branch creation,
YAML validation, pre-upload, commit), stores each commit's files, and can fail the next N calls to a path with
a given status (to test retries)."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

DROP = 0  # `fail(..., DROP)`: close the connection without a response
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pkl")
REPO_KINDS = "(models|spaces|datasets)"  # the API path of each repo type (commit records its type, singular)

TOKEN = "hf_standinsecrettoken0123456789"  # the stand-in's token (tests set it as HF_TOKEN)


def model_index_problem(readme: bytes | None) -> str | None:
    """What the Hub's metadata check would object to in a card's `model-index` (None if fine or absent): a list
    of {name, results: [{task: {type}, dataset: {name, type}, metrics: [{type, value}]}]}."""
    if readme is None:
        return None
    import yaml

    text = readme.decode()
    if not text.startswith("---"):
        return None
    metadata = yaml.safe_load(text.split("---", 2)[1]) or {}
    index = metadata.get("model-index")
    if index is None:
        return None
    if not isinstance(index, list) or not index:
        return "model-index must be a non-empty list"
    for entry in index:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            return "each model-index entry needs a name"
        for result in entry.get("results") or []:
            if not isinstance(result.get("task", {}).get("type"), str):
                return "each result needs task.type"
            dataset = result.get("dataset", {})
            if not (isinstance(dataset.get("name"), str) and isinstance(dataset.get("type"), str)):
                return "each result needs dataset.name and dataset.type"
            metrics = result.get("metrics")
            if not isinstance(metrics, list) or not metrics:
                return "each result needs a list of metrics"
            for metric in metrics:
                if not isinstance(metric.get("type"), str) or not isinstance(metric.get("value"), int | float | str):
                    return "each metric needs a type and a value"
    return None


class HubStandIn:
    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict]] = []  # (method, path, headers)
        self.commits: list[dict] = []  # {"repo", "revision", "files": {path: bytes}, "summary"}
        self.branches: list[tuple[str, str]] = []
        self.repos: list[dict] = []
        self.failures: list[list] = []  # [path regex, status, remaining count]
        self.lfs: dict[str, bytes] = {}  # sha256 -> content uploaded to LFS storage
        self.lfs_paths: list[str] = []  # files committed as LFS pointers
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def _reply(self, status: int, body: dict | list | None = None) -> None:
                data = json.dumps(body if body is not None else {}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> bytes:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    return self.rfile.read(length)
                if self.headers.get("Transfer-Encoding") == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().strip(), 16)
                        if size == 0:
                            self.rfile.readline()
                            break
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    return b"".join(chunks)
                return b""

            def _handle(self, method: str) -> None:
                path = unquote(self.path.split("?")[0])
                body = self._body()
                stand_in.requests.append((method, path, dict(self.headers)))
                for failure in stand_in.failures:
                    if failure[2] > 0 and re.search(failure[0], path):
                        failure[2] -= 1
                        if failure[1] == DROP:  # the connection closes with no response at all
                            self.close_connection = True
                            return None
                        return self._reply(failure[1], {"error": "stand-in failure"})
                match = re.match(r"^/lfs-upload/([0-9a-f]{64})$", path)
                if match and method == "PUT":  # a presigned storage URL: no token, the content must hash to its oid
                    if hashlib.sha256(body).hexdigest() != match.group(1):
                        return self._reply(400, {"error": "content does not match its sha256"})
                    stand_in.lfs[match.group(1)] = body
                    return self._reply(200, {})
                if stand_in.token is not None and self.headers.get("Authorization") != f"Bearer {stand_in.token}":
                    return self._reply(401, {"error": "Invalid credentials in Authorization header"})
                if path == "/api/repos/create":
                    payload = json.loads(body or b"{}")
                    name = f"{payload.get('organization') or 'user'}/{payload['name']}"
                    if any(r["name"] == payload["name"] and r.get("organization") == payload.get("organization")
                           for r in stand_in.repos):  # fmt: skip
                        # As the Hub: creating an existing repo is a 409 (huggingface_hub's exist_ok absorbs it).
                        return self._reply(
                            409, {"error": "You already created this model repo", "url": f"{stand_in.url}/{name}"}
                        )
                    stand_in.repos.append(payload)
                    return self._reply(200, {"url": f"{stand_in.url}/{name}", "name": name})
                if path == "/api/validate-yaml":
                    return self._reply(200, {})
                match = re.match(rf"^/api/{REPO_KINDS}/(.+?/.+?)/branch/(.+)$", path)
                if match:
                    stand_in.branches.append((match.group(2), match.group(3)))
                    return self._reply(200, {})
                match = re.match(rf"^/api/{REPO_KINDS}/(.+?/.+?)/preupload/(.+)$", path)
                if match:  # as the Hub's .gitattributes: weights go through LFS storage, small files inline
                    files = json.loads(body)["files"]
                    modes = [("lfs" if f["path"].endswith(LFS_SUFFIXES) else "regular") for f in files]
                    return self._reply(
                        200,
                        {
                            "files": [
                                {"path": f["path"], "uploadMode": m, "shouldIgnore": False}
                                for f, m in zip(files, modes)
                            ]
                        },
                    )
                if re.match(r"^/(.+?/.+?)\.git/info/lfs/objects/batch$", path):
                    objects = json.loads(body)["objects"]
                    return self._reply(200, {"transfer": "basic", "objects": [
                        {"oid": o["oid"], "size": o["size"], "actions": {
                            "upload": {"href": f"{stand_in.url}/lfs-upload/{o['oid']}"},
                            "verify": {"href": f"{stand_in.url}/lfs-verify"}}}
                        for o in objects]})  # fmt: skip
                if path == "/lfs-verify":
                    oid = json.loads(body)["oid"]
                    return self._reply(200 if oid in stand_in.lfs else 404, {})
                match = re.match(rf"^/api/{REPO_KINDS}/(.+?/.+?)/commit/(.+)$", path)
                if match:
                    files, summary = {}, None
                    for line in body.decode().splitlines():
                        record = json.loads(line)
                        if record["key"] == "header":
                            summary = record["value"].get("summary")
                        elif record["key"] == "file":
                            files[record["value"]["path"]] = base64.b64decode(record["value"]["content"])
                        elif record["key"] == "lfsFile":
                            oid = record["value"]["oid"]
                            if oid not in stand_in.lfs:
                                return self._reply(400, {"error": f"LFS object {oid} was never uploaded"})
                            files[record["value"]["path"]] = stand_in.lfs[oid]
                            stand_in.lfs_paths.append(record["value"]["path"])
                    problem = model_index_problem(files.get("README.md"))
                    if problem:  # the Hub refuses a commit whose card metadata is invalid
                        return self._reply(400, {"error": f"Invalid metadata in README.md: {problem}"})
                    kind, repo, revision = match.groups()
                    stand_in.commits.append(
                        {"repo": repo, "revision": revision, "files": files, "summary": summary, "repo_type": kind[:-1]}
                    )
                    oid = f"{len(stand_in.commits):040x}"
                    return self._reply(200, {"commitUrl": f"{stand_in.url}/{repo}/commit/{oid}", "commitOid": oid})
                return self._reply(404, {"error": f"stand-in does not know {method} {path}"})

            def do_POST(self) -> None:  # noqa: N802
                self._handle("POST")

            def do_GET(self) -> None:  # noqa: N802
                self._handle("GET")

            def do_PUT(self) -> None:  # noqa: N802
                self._handle("PUT")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    token: str | None = None  # when set, every request must carry `Authorization: Bearer <token>` (else 401)

    def fail(self, path_regex: str, status: int, times: int = 1) -> None:
        """The next `times` calls to a path answer `status`, or drop the connection with `status=DROP`."""
        self.failures.append([path_regex, status, times])

    def __enter__(self) -> HubStandIn:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
