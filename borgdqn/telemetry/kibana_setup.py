"""``borgdqn kibana-setup``: import the "Borg collective" saved objects into Kibana (a Job in the cluster).

1. Wait until Kibana answers ``GET /api/status`` with 200: a connection refused, a 503 (Kibana starting or its
   Elasticsearch away), a 401 (its security not up yet) are retried with a growing delay, one progress line
   per attempt, until ``timeout_s`` has passed; then one line says what the last answer was.
2. ``POST /api/saved_objects/_import?overwrite=true``: a multipart/form-data body whose ``file`` part is the
   NDJSON of :mod:`borgdqn.telemetry.kibana_objects`, header ``kbn-xsrf: true``. Overwriting makes the Job
   idempotent: a rerun (or a newer image) replaces the objects it made before.
3. Check Kibana's answer (``success``, ``successCount``, ``errors``): any object that failed fails the setup
   with one line naming them.

Credentials come from ``BORG_KIBANA_USERNAME`` / ``BORG_KIBANA_PASSWORD`` (basic auth; ECK's ``elastic`` user
from its Secret), never from the command line; ``ca_file`` verifies ECK's self-signed TLS. The standard library
does the HTTP: the light image has no HTTP client package. Proxy variables are ignored: Kibana is a Service in
the same cluster.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import secrets
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

USERNAME_ENV = "BORG_KIBANA_USERNAME"
PASSWORD_ENV = "BORG_KIBANA_PASSWORD"
URL_ENV = "BORG_KIBANA_URL"
STATUS_PATH = "/api/status"
IMPORT_PATH = "/api/saved_objects/_import?overwrite=true"
IMPORT_FILENAME = "borg-collective.ndjson"
REQUEST_TIMEOUT_S = 30.0
FIRST_DELAY_S = 1.0
MAX_DELAY_S = 10.0


class KibanaSetupError(Exception):
    """The setup failed; the message is one line for a person."""


class KibanaConfigError(ValueError):
    """Bad input (URL, CA file, credentials, timeout): the caller's mistake."""


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(frozen=True)
class ImportResult:
    success_count: int
    objects: int


def credentials_from_env(environ: Mapping[str, str] | None = None) -> tuple[str, str] | None:
    env = os.environ if environ is None else environ
    user, password = env.get(USERNAME_ENV, ""), env.get(PASSWORD_ENV, "")
    if bool(user) != bool(password):
        missing = PASSWORD_ENV if user else USERNAME_ENV
        raise KibanaConfigError(f"{missing} is not set: set both {USERNAME_ENV} and {PASSWORD_ENV}, or neither")
    return (user, password) if user else None


def _check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise KibanaConfigError(f"--kibana {url!r}: expected http(s)://HOST:PORT, e.g. https://pong-kibana-kb-http:5601")
    if parts.username or parts.password:
        raise KibanaConfigError(f"--kibana: put no credentials in the URL; use {USERNAME_ENV}/{PASSWORD_ENV}")
    if parts.query or parts.fragment:
        raise KibanaConfigError(f"--kibana {url!r}: no query or fragment, only the base URL (with a base path)")
    return url.rstrip("/")


class KibanaClient:
    """The two requests the setup makes, over urllib; proxies ignored, TLS verified (against ``ca_file``)."""

    def __init__(self, url: str, *, credentials: tuple[str, str] | None = None, ca_file: Path | None = None,
                 request_timeout_s: float = REQUEST_TIMEOUT_S) -> None:
        self.url = _check_url(url)
        self._timeout = request_timeout_s
        handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
        if self.url.startswith("https:") or ca_file is not None:
            if ca_file is not None and not ca_file.is_file():
                raise KibanaConfigError(f"--ca-file {ca_file}: no such file")
            context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
            handlers.append(urllib.request.HTTPSHandler(context=context))
        self._opener = urllib.request.build_opener(*handlers)
        self._headers = {"kbn-xsrf": "true", "User-Agent": "borgdqn-kibana-setup"}
        if credentials is not None:
            token = base64.b64encode(f"{credentials[0]}:{credentials[1]}".encode()).decode()
            self._headers["Authorization"] = f"Basic {token}"

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: Mapping[str, str] | None = None) -> Answer:
        """One request; an HTTP error status is an :class:`Answer` too. Raises OSError when nothing answered."""
        req = urllib.request.Request(self.url + path, data=body, method=method,
                                     headers={**self._headers, **(headers or {})})
        try:
            with self._opener.open(req, timeout=self._timeout) as resp:
                return Answer(resp.status, resp.read())
        except urllib.error.HTTPError as err:
            with err:
                return Answer(err.code, err.read())


def _reason(answer: Answer) -> str:
    """One line for a non-2xx answer: Kibana's ``message`` when it sent its error JSON."""
    text = ""
    try:
        data = answer.json()
        if isinstance(data, dict):
            text = str(data.get("message") or data.get("error") or "")
    except ValueError:
        text = answer.body[:200].decode(errors="replace")
    text = " ".join(text.split())[:200]
    hint = f" (check {USERNAME_ENV}/{PASSWORD_ENV})" if answer.status in (401, 403) else ""
    return f"HTTP {answer.status}{': ' + text if text else ''}{hint}"


def _oserror(err: OSError) -> str:
    reason = getattr(err, "reason", None) or err
    return " ".join(str(reason).split()) or err.__class__.__name__


def wait_for_kibana(client: KibanaClient, timeout_s: float, *, clock: Callable[[], float] = time.monotonic,
                    sleep: Callable[[float], None] = time.sleep) -> int:
    """Polls ``GET /api/status`` until it answers 200; returns the attempts made. Raises KibanaSetupError
    (one line, with the last answer) once ``timeout_s`` has passed."""
    start = clock()
    delay = FIRST_DELAY_S
    attempt = 0
    while True:
        attempt += 1
        try:
            answer = client.request("GET", STATUS_PATH)
            if answer.status == 200:
                log.info("kibana up url=%s attempts=%d waited_s=%.1f", client.url, attempt, clock() - start)
                return attempt
            last = _reason(answer)
        except OSError as err:  # refused, DNS not there yet, TLS, timeout
            last = _oserror(err)
        waited = clock() - start
        if waited + delay > timeout_s:
            raise KibanaSetupError(f"Kibana at {client.url} did not come up within {timeout_s:g}s "
                                   f"({attempt} attempts; last: {last})")
        log.info("waiting for kibana url=%s attempt=%d last=%r retry_in_s=%.1f waited_s=%.0f timeout_s=%g",
                 client.url, attempt, last, delay, waited, timeout_s)
        sleep(delay)
        delay = min(delay * 2, MAX_DELAY_S)


def multipart(field: str, filename: str, content: bytes, content_type: str = "application/ndjson",
              boundary: str | None = None) -> tuple[bytes, str]:
    """A multipart/form-data body with one file part; returns (body, Content-Type header value)."""
    boundary = boundary or f"borgdqn-{secrets.token_hex(16)}"
    if boundary.encode() in content:
        raise ValueError("multipart boundary occurs in the content")
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: {content_type}\r\n\r\n").encode()
    return head + content + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _failures(errors: Any) -> str:
    if not isinstance(errors, list) or not errors:
        return "no errors listed"
    parts = []
    for err in errors[:5]:
        if not isinstance(err, dict):
            parts.append(str(err)[:80])
            continue
        detail: dict[str, Any] = err["error"] if isinstance(err.get("error"), dict) else {}
        kind = detail.get("type", "?")
        if kind == "missing_references":
            missing = ",".join(f"{r.get('type')}/{r.get('id')}" for r in detail.get("references", [])
                               if isinstance(r, dict))
            kind = f"missing_references: {missing}"
        elif detail.get("message"):
            kind = f"{kind}: {detail['message']}"
        parts.append(f"{err.get('type', '?')}/{err.get('id', '?')} ({' '.join(str(kind).split())})")
    more = f" and {len(errors) - 5} more" if len(errors) > 5 else ""
    return "; ".join(parts) + more


def import_saved_objects(client: KibanaClient, content: bytes, objects: int) -> ImportResult:
    """Imports ``content`` (NDJSON of ``objects`` saved objects), overwriting; raises KibanaSetupError (one
    line) when Kibana refuses the request or any object failed."""
    body, content_type = multipart("file", IMPORT_FILENAME, content)
    try:
        answer = client.request("POST", IMPORT_PATH, body, {"Content-Type": content_type})
    except OSError as err:
        raise KibanaSetupError(f"import into Kibana at {client.url} failed: {_oserror(err)}") from None
    if answer.status != 200:
        raise KibanaSetupError(f"Kibana at {client.url} refused the import: {_reason(answer)}")
    try:
        result = answer.json()
    except ValueError:
        raise KibanaSetupError(f"Kibana at {client.url} answered the import with no JSON") from None
    if not isinstance(result, dict):
        raise KibanaSetupError(f"Kibana at {client.url} answered the import with {type(result).__name__} JSON")
    count = result.get("successCount", 0)
    count = count if isinstance(count, int) else 0
    errors = result.get("errors") or []
    if result.get("success") is not True or errors:
        failed = len(errors) if isinstance(errors, list) else "some"
        raise KibanaSetupError(f"Kibana imported {count} of {objects} saved objects; {failed} failed: "
                               f"{_failures(errors)}")
    if count != objects:
        raise KibanaSetupError(f"Kibana reported {count} saved objects imported, {objects} were sent")
    return ImportResult(success_count=count, objects=objects)


def count_objects(content: bytes) -> int:
    """Saved objects in an NDJSON file (a non-empty line each); KibanaConfigError when a line is no object."""
    n = 0
    for i, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            raise KibanaConfigError(f"NDJSON line {i} is not JSON") from None
        if not isinstance(obj, dict) or "type" not in obj or "id" not in obj:
            raise KibanaConfigError(f"NDJSON line {i} is not a saved object (no type or id)")
        n += 1
    if not n:
        raise KibanaConfigError("the NDJSON holds no saved objects")
    return n


def setup(url: str, *, timeout_s: float = 600.0, ca_file: Path | None = None, ndjson_file: Path | None = None,
          environ: Mapping[str, str] | None = None, sleep: Callable[[float], None] = time.sleep) -> ImportResult:
    """Wait for Kibana, import the saved objects (the dashboard's, or ``ndjson_file``'s), check the result."""
    if not timeout_s > 0:
        raise KibanaConfigError(f"--timeout {timeout_s:g}: must be > 0 seconds")
    if ndjson_file is not None:
        if not ndjson_file.is_file():
            raise KibanaConfigError(f"--file {ndjson_file}: no such file")
        content = ndjson_file.read_bytes()
    else:
        from borgdqn.telemetry.kibana_objects import ndjson

        content = ndjson()
    objects = count_objects(content)
    client = KibanaClient(url, credentials=credentials_from_env(environ), ca_file=ca_file)
    wait_for_kibana(client, timeout_s, sleep=sleep)
    result = import_saved_objects(client, content, objects)
    log.info("saved objects imported url=%s objects=%d", client.url, result.success_count)
    return result
