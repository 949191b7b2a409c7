"""``borgdqn kibana-setup`` against a STAND-IN for Kibana (Kibana itself cannot run here).

The stand-in is a real HTTP server (``http.server`` in a thread, on loopback) that plays the two endpoints the
setup uses, as Kibana 8 answers them: ``GET /api/status`` (503 while "starting", then 200) and
``POST /api/saved_objects/_import`` (Kibana's import response shape). It checks every request it gets: method,
path and query, the ``kbn-xsrf`` header, basic auth when credentials are set, and a multipart/form-data body
whose ``file`` part is exactly the repository's NDJSON. A request that breaks the contract is answered 400 and
recorded, so the test fails naming it.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from borgdqn.cli import main
from borgdqn.telemetry import kibana_setup
from borgdqn.telemetry.kibana_objects import REPO_NDJSON

ROOT = Path(__file__).resolve().parents[2]
NDJSON = (ROOT / REPO_NDJSON).read_bytes()
OBJECTS = [json.loads(line) for line in NDJSON.splitlines()]


class StandInKibana(ThreadingHTTPServer):
    """A stand-in for Kibana's status and saved-objects import API (not Kibana: named so on purpose)."""

    daemon_threads = True

    def __init__(self, *, starting_for: int = 2, credentials: tuple[str, str] | None = None,
                 import_reply: dict[str, Any] | None = None, import_status: int = 200) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.starting_for = starting_for  # status requests answered 503 before the 200
        self.credentials = credentials
        self.import_reply = import_reply
        self.import_status = import_status
        self.requests: list[tuple[str, str]] = []
        self.violations: list[str] = []
        self.imported: list[bytes] = []
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self) -> StandInKibana:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: StandInKibana

    def log_message(self, format: str, *args: Any) -> None:  # keep pytest's output clean
        pass

    def _reply(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _refuse(self, status: int, why: str) -> None:
        self.server.violations.append(f"{self.command} {self.path}: {why}")
        self._reply(status, {"statusCode": status, "error": "Bad Request", "message": why})

    def _auth_ok(self) -> bool:
        creds = self.server.credentials
        got = self.headers.get("Authorization")
        if creds is None:
            if got is not None:
                self._refuse(400, "an Authorization header without credentials set")
                return False
            return True
        want = "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
        if got != want:
            self._refuse(401, "bad or missing basic auth")
            return False
        return True

    def do_GET(self) -> None:
        self.server.requests.append(("GET", self.path))
        if self.path != "/api/status":
            self._refuse(404, "unexpected GET")
            return
        if not self._auth_ok():
            return
        if self.server.starting_for > 0:
            self.server.starting_for -= 1
            self._reply(503, {"status": {"overall": {"level": "unavailable", "summary": "starting"}}})
            return
        self._reply(200, {"name": "stand-in", "version": {"number": "8.19.0"},
                          "status": {"overall": {"level": "available"}}})

    def do_POST(self) -> None:
        self.server.requests.append(("POST", self.path))
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length)
        if self.path != "/api/saved_objects/_import?overwrite=true":
            self._refuse(404, "unexpected POST path or query")
            return
        if self.headers.get("kbn-xsrf") != "true":
            self._refuse(400, "missing kbn-xsrf header")
            return
        if not self._auth_ok():
            return
        content_type = self.headers.get("Content-Type", "")
        if not content_type.startswith("multipart/form-data; boundary="):
            self._refuse(415, f"not multipart/form-data: {content_type!r}")
            return
        message = BytesParser(policy=HTTP).parsebytes(
            f"Content-Type: {content_type}\r\n\r\n".encode() + body)
        parts = list(message.iter_parts())
        files = [p for p in parts if p.get_param("name", header="content-disposition") == "file"]
        if len(parts) != 1 or len(files) != 1:
            self._refuse(400, f"expected one part named file, got {len(parts)} parts")
            return
        part = files[0]
        filename = part.get_filename() or ""
        if not filename.endswith(".ndjson"):
            self._refuse(400, f"file part's filename {filename!r} is not *.ndjson")
            return
        content = part.get_payload(decode=True)
        self.server.imported.append(content)
        if content != NDJSON:
            self._refuse(400, "the file part is not the repository's NDJSON")
            return
        objects = [json.loads(line) for line in content.splitlines()]
        reply = self.server.import_reply or {
            "success": True, "successCount": len(objects),
            "successResults": [{"type": o["type"], "id": o["id"], "meta": {"title": o["attributes"].get(
                "title", o["id"]), "icon": "dashboardApp"}, "overwrite": True} for o in objects],
            "warnings": [],
        }
        self._reply(self.server.import_status, reply)


@pytest.fixture
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kibana_setup, "FIRST_DELAY_S", 0.05)  # the stand-in "starts" in a fraction of a second


@pytest.fixture
def no_creds(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in (kibana_setup.USERNAME_ENV, kibana_setup.PASSWORD_ENV, kibana_setup.URL_ENV):
        monkeypatch.delenv(name, raising=False)
    yield


def test_setup_waits_for_kibana_then_imports_the_repo_ndjson(fast_retries: None, no_creds: None,
                                                             capsys: pytest.CaptureFixture[str],
                                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger=kibana_setup.__name__)
    with StandInKibana(starting_for=2) as kibana:
        assert main(["kibana-setup", "--kibana", kibana.url + "/", "--timeout", "30"]) == 0
    assert kibana.violations == []
    assert kibana.requests == [("GET", "/api/status")] * 3 + [("POST", "/api/saved_objects/_import?overwrite=true")]
    assert kibana.imported == [NDJSON]
    out = capsys.readouterr()
    assert out.out.splitlines() == [
        f"imported {len(OBJECTS)} saved objects into {kibana.url}; dashboard \"Borg collective\": "
        f"{kibana.url}/app/dashboards#/view/borgdqn-borg-collective"]
    waiting = [r.getMessage() for r in caplog.records if r.getMessage().startswith("waiting for kibana")]
    assert len(waiting) == 2 and "last='HTTP 503'" in waiting[0]  # a progress line per attempt that found it starting


def test_credentials_from_the_environment_are_sent_as_basic_auth(fast_retries: None, no_creds: None,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(kibana_setup.USERNAME_ENV, "elastic")
    monkeypatch.setenv(kibana_setup.PASSWORD_ENV, "s3cr:et/")
    with StandInKibana(starting_for=1, credentials=("elastic", "s3cr:et/")) as kibana:
        monkeypatch.setenv(kibana_setup.URL_ENV, kibana.url)
        assert main(["kibana-setup"]) == 0  # the URL from BORG_KIBANA_URL
    assert kibana.violations == []
    assert [m for m, _ in kibana.requests] == ["GET", "GET", "POST"]


def test_refused_credentials_end_with_one_line_naming_them(fast_retries: None, no_creds: None,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(kibana_setup.USERNAME_ENV, "elastic")
    monkeypatch.setenv(kibana_setup.PASSWORD_ENV, "wrong")
    with StandInKibana(starting_for=0, credentials=("elastic", "right")) as kibana:
        assert main(["kibana-setup", "--kibana", kibana.url, "--timeout", "0.5"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("borgdqn: failed: Kibana at") and "HTTP 401" in err and "BORG_KIBANA_PASSWORD" in err
    assert "wrong" not in err


def test_failed_objects_fail_the_setup_with_one_line(fast_retries: None, no_creds: None,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    reply = {
        "success": False, "successCount": len(OBJECTS) - 2,
        "errors": [
            {"id": "borgdqn-lens-loss-per-agent", "type": "lens", "title": "Loss",
             "error": {"type": "missing_references", "references": [{"type": "index-pattern", "id": "x"}]}},
            {"id": "borgdqn-borg-collective", "type": "dashboard", "title": "Borg collective",
             "error": {"type": "unknown", "message": "boom\nwith a second line", "statusCode": 500}},
        ],
    }
    with StandInKibana(starting_for=0, import_reply=reply) as kibana:
        assert main(["kibana-setup", "--kibana", kibana.url, "--timeout", "5"]) == 1
    assert kibana.violations == []
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert err.startswith(f"borgdqn: failed: Kibana imported {len(OBJECTS) - 2} of {len(OBJECTS)} saved objects; "
                          "2 failed:")
    assert "lens/borgdqn-lens-loss-per-agent (missing_references: index-pattern/x)" in err
    assert "dashboard/borgdqn-borg-collective (unknown: boom with a second line)" in err


def test_a_refused_import_fails_with_kibanas_message(fast_retries: None, no_creds: None,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    reply = {"statusCode": 413, "error": "Payload Too Large", "message": "Payload content length greater than max"}
    with StandInKibana(starting_for=0, import_reply=reply, import_status=413) as kibana:
        assert main(["kibana-setup", "--kibana", kibana.url]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"borgdqn: failed: Kibana at {kibana.url} refused the import: HTTP 413: Payload content length "
                   "greater than max")


def test_kibana_that_never_comes_up_ends_after_the_timeout_with_one_line(no_creds: None) -> None:
    """A real CLI process against a stand-in that stays "starting": bounded by --timeout, progress, one line."""
    with StandInKibana(starting_for=10**6) as kibana:
        started = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "borgdqn", "kibana-setup", "--kibana", kibana.url,
                                 "--timeout", "2.5"], capture_output=True, text=True, timeout=60)
        took = time.monotonic() - started
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == (f"borgdqn: failed: Kibana at {kibana.url} did not come up within 2.5s (2 attempts; "
                         "last: HTTP 503)")
    assert sum("waiting for kibana" in line for line in lines) == 1  # retried after 1s; a 2s wait would pass 2.5s
    assert took < 20
    assert all(r == ("GET", "/api/status") for r in kibana.requests)


def test_nothing_listening_is_retried_and_named(no_creds: None, fast_retries: None,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    with StandInKibana() as kibana:
        url = kibana.url  # a port that was just closed: connection refused
    assert main(["kibana-setup", "--kibana", url, "--timeout", "0.3"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"borgdqn: failed: Kibana at {url} did not come up within 0.3s") and "refused" in err


@pytest.mark.parametrize(("argv", "env", "message"), [
    (["--kibana", "pong-kibana:5601"], {}, "expected http(s)://HOST:PORT"),
    (["--kibana", "http://elastic:pw@kibana:5601"], {}, "put no credentials in the URL"),
    ([], {}, "give --kibana URL"),
    (["--kibana", "http://kibana:5601", "--timeout", "0"], {}, "--timeout 0: must be > 0"),
    (["--kibana", "https://kibana:5601", "--ca-file", "/nonexistent/ca.crt"], {}, "--ca-file /nonexistent/ca.crt"),
    (["--kibana", "http://kibana:5601", "--file", "/nonexistent.ndjson"], {}, "--file /nonexistent.ndjson"),
    (["--kibana", "http://kibana:5601"], {"BORG_KIBANA_USERNAME": "elastic"}, "BORG_KIBANA_PASSWORD is not set"),
])
def test_bad_input_is_one_line_and_exit_2(no_creds: None, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str], argv: list[str],
                                          env: dict[str, str], message: str) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["kibana-setup", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("borgdqn: error:") and message in err, err


def test_another_ndjson_file_can_be_imported(tmp_path: Path, fast_retries: None, no_creds: None) -> None:
    """--file imports that file as is; the stand-in (which wants the repo's NDJSON) sees exactly its bytes."""
    other = tmp_path / "other.ndjson"
    other.write_bytes(NDJSON.splitlines(keepends=True)[0])
    with StandInKibana(starting_for=0) as kibana:
        assert main(["kibana-setup", "--kibana", kibana.url, "--file", str(other)]) == 1  # the stand-in refuses
    assert kibana.imported == [other.read_bytes()]
    assert kibana.violations == ["POST /api/saved_objects/_import?overwrite=true: the file part is not the "
                                 "repository's NDJSON"]
