"""The API client's own HTTP/1.1 (issue 17: ``http.client`` loaded ``email`` and ``ssl`` into
every ``igdtrigger run``): what it sends, every answer shape aiohttp or an impostor can give,
and a launcher hook that talks to a service without loading either."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from igdtrigger.cli.client import Client
from igdtrigger.core.errors import ApiError, ServiceUnavailable

from .test_wrapper import ROOT, service  # noqa: F401 (the fixture)


class OneShot:
    """A TCP listener on loopback that answers each connection with ``answer`` (sent in the
    pieces given) and keeps what the client sent."""

    def __init__(self, *answer: bytes) -> None:
        self.answer = answer
        self.got = b""
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            conn.settimeout(5)
            while b"\r\n\r\n" not in self.got:
                self.got += conn.recv(65536)
            head, _, body = self.got.partition(b"\r\n\r\n")
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            while len(body) < length:
                body += conn.recv(65536)
            self.got = head + b"\r\n\r\n" + body
            for piece in self.answer:
                conn.sendall(piece)

    def close(self) -> None:
        self.thread.join(5)
        self.sock.close()


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[OneShot]:
    s = OneShot(*request.param)
    yield s
    s.close()


def _client(s: OneShot) -> Client:
    return Client(f"http://127.0.0.1:{s.port}", timeout=5)


BODY = json.dumps({"id": "a1", "state": "open"}).encode()


@pytest.mark.parametrize("server", [
    # aiohttp's usual answer, the body in its own packet
    (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
     + str(len(BODY)).encode() + b"\r\n\r\n", BODY),
    # chunked, split mid-chunk
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n" + BODY[:5],
     b"\r\n" + hex(len(BODY) - 5)[2:].encode() + b"\r\n" + BODY[5:] + b"\r\n0\r\n\r\n"),
    # no length at all: the body ends with the connection
    (b"HTTP/1.1 200 OK\r\n\r\n" + BODY,),
], indirect=True)
def test_answers_of_every_framing_are_read_whole(server: OneShot) -> None:
    data = _client(server).request("POST", "/api/v1/activations", {"rule": "demo", "ttl": 30})
    assert data == {"id": "a1", "state": "open"}
    head, _, body = server.got.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /api/v1/activations HTTP/1.1"
    assert f"Host: 127.0.0.1:{server.port}" in lines
    assert f"Content-Length: {len(body)}" in lines and "Connection: close" in lines
    assert json.loads(body) == {"rule": "demo", "ttl": 30}


@pytest.mark.parametrize(("server", "said"), [
    ((b"SSH-2.0-OpenSSH_9.2\r\n\r\n",), "not an HTTP answer"),
    ((b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"id\"",), "cut short"),
    ((b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",), "chunked"),
    ((b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",), "not igdtrigger's JSON"),
    ((b"",), "closed before an answer"),
], indirect=["server"])
def test_a_broken_answer_is_one_clear_error(server: OneShot, said: str) -> None:
    with pytest.raises(ServiceUnavailable, match=said) as exc:
        _client(server).request("GET", "/api/v1/status")
    assert f"127.0.0.1:{server.port}" in str(exc.value)


@pytest.mark.parametrize("server", [
    (b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\n\r\n"
     b'{"error": {"message": "unknown rule \'x\'"}}',),
], indirect=True)
def test_an_error_answer_is_the_services_message(server: OneShot) -> None:
    with pytest.raises(ApiError, match="unknown rule 'x'") as exc:
        _client(server).request("POST", "/api/v1/activations", {"rule": "x"})
    assert exc.value.status == 404


def test_run_through_a_service_loads_neither_email_nor_ssl(
        service: tuple[str, Path]) -> None:  # noqa: F811
    """The launcher hook's path to a running service: a socket, a small request, the config."""
    url, cfg = service
    code = ("import sys\nfrom igdtrigger.cli.main import main\n"
            f"rc = main(['run', '--config', {str(cfg)!r}, '--server', {url!r}, '--rule', "
            f"'demo', '--', {sys.executable!r}, '-c', 'pass'])\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'http', 'email', 'ssl', "
            "'urllib.request', 'aiohttp', 'zeroconf', 'asyncio'}))\n"
            "sys.exit(rc)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert "open on" in p.stderr, p.stderr
    assert p.stdout.strip().splitlines()[-1] == "[]", p.stdout
