"""Paths under the APIs with extra leading slashes (a base URL ending in '/': `//api/chat`) get the
protocol's JSON 404 over a real socket, under daphne and uvicorn, never Django's HTML page. They are
not normalised: a route answers only at its own path."""

from __future__ import annotations

import json
import socket

import pytest

from tests.conftest import RouterProcess


def raw_post(server: RouterProcess, path: str) -> tuple[int, dict[str, str], bytes]:
    """POST `path` exactly as written (HTTP clients collapse or reject '//')."""
    host, port = server.url.removeprefix("http://").split(":")
    body = b'{"model": "llama3", "messages": []}'
    request = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    head, _, payload = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, payload


@pytest.mark.parametrize("server_name", ["daphne", "uvicorn"])
def test_double_slash_api_paths_get_the_protocols_json_404(server_name, router) -> None:
    server = router(server=server_name)
    for path, openai in [("//api/chat", False), ("///api/tags", False), ("//v1/chat/completions", True)]:
        status, headers, payload = raw_post(server, path)
        assert status == 404 and headers["content-type"].startswith("application/json"), (path, payload)
        error = json.loads(payload)["error"]
        if openai:
            assert error["type"] == "not_found_error" and path in error["message"]
        else:
            assert isinstance(error, str) and path in error
    assert "Traceback" not in server.log()
