"""A loopback HTTP server that answers ``POST /v1/chat/completions`` like an OpenAI-compatible API.

Tests script its replies (normal answers, rate limits, server errors, garbage, slow answers) and
read back what the client sent. It binds 127.0.0.1 on an ephemeral port, serves from a daemon
thread, and stops when the ``with`` block ends; a slow reply waits on an event that stopping sets,
so no handler outlives the test.
"""
from __future__ import annotations

import dataclasses
import http.server
import json
import threading
from typing import Any, Optional, Union


@dataclasses.dataclass
class Reply:
    """One scripted HTTP answer. ``body`` is JSON-encoded unless it is bytes or str."""

    status: int = 200
    body: Union[dict, list, str, bytes] = dataclasses.field(default_factory=dict)
    headers: dict = dataclasses.field(default_factory=dict)
    delay: float = 0.0  # seconds to wait before answering (for client timeouts)


def chat_reply(text: str, *, model: str = "fake-model") -> Reply:
    """A 200 chat-completions answer whose message content is ``text``."""
    return Reply(
        body={
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        }
    )


def error_reply(status: int, message: str, *, headers: Optional[dict] = None) -> Reply:
    """An error answer shaped like the API's ``{"error": {"message": ...}}``."""
    return Reply(status=status, body={"error": {"message": message, "type": "fake_error"}}, headers=headers or {})


@dataclasses.dataclass
class RecordedRequest:
    path: str
    headers: dict
    body: Any  # parsed JSON, or the raw text when it is not JSON


class FakeOpenAIServer:
    """Scripted chat-completions server. ``script`` is consumed one reply per request; the last
    reply repeats once the script runs out (so a persistent 429 is ``[error_reply(429, ...)]``)."""

    def __init__(self, script: Optional[list[Reply]] = None):
        self.script: list[Reply] = list(script or [chat_reply("yes")])
        self.requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._served = 0
        self._httpd: Optional[http.server.ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    @property
    def base_url(self) -> str:
        assert self._httpd is not None, "server not started"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def _next_reply(self, request: RecordedRequest) -> Reply:
        with self._lock:
            self.requests.append(request)
            reply = self.script[min(self._served, len(self.script) - 1)]
            self._served += 1
            return reply

    def start(self) -> "FakeOpenAIServer":
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
                return

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(length).decode("utf-8", "replace")
                try:
                    body: Any = json.loads(raw)
                except ValueError:
                    body = raw
                recorded = RecordedRequest(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                if self.path.rstrip("/") != "/v1/chat/completions":
                    reply = Reply(status=404, body={"error": {"message": f"no route {self.path}"}})
                    with server._lock:
                        server.requests.append(recorded)
                else:
                    reply = server._next_reply(recorded)
                if reply.delay and server._stopping.wait(reply.delay):
                    return  # stopping: drop the connection without answering
                payload = reply.body
                if isinstance(payload, (dict, list)):
                    data = json.dumps(payload).encode("utf-8")
                    content_type = "application/json"
                elif isinstance(payload, str):
                    data = payload.encode("utf-8")
                    content_type = "text/plain"
                else:
                    data = payload
                    content_type = "application/octet-stream"
                try:
                    self.send_response(reply.status)
                    self.send_header("Content-Type", content_type)
                    self.send_header("Content-Length", str(len(data)))
                    for key, value in reply.headers.items():
                        self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    return  # the client gave up (timeout test)

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True
            block_on_close = False

            def handle_error(self, request: Any, client_address: Any) -> None:
                return  # a client that timed out and closed is expected here

        self._httpd = Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "FakeOpenAIServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
