"""wait_until_ok: returns on the first 200, fails fast when the server's process is gone, times out otherwise."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator

import pytest

from load_tests.readiness import wait_until_ok


class _Ready(http.server.BaseHTTPRequestHandler):
    calls = 0

    def do_GET(self) -> None:
        type(self).calls += 1
        self.send_response(200 if type(self).calls >= 3 else 503)  # ready on the third poll
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Ready)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/health"
    httpd.shutdown()


def test_returns_once_the_server_answers_200(server: str) -> None:
    _Ready.calls = 0
    wait_until_ok(server, timeout_s=10, poll_s=0.01)
    assert _Ready.calls == 3


def test_a_dead_process_fails_at_once(server: str) -> None:
    with pytest.raises(RuntimeError, match="exited"):
        wait_until_ok(server, timeout_s=10, alive=lambda: False)


def test_no_answer_times_out() -> None:
    with pytest.raises(TimeoutError, match="did not answer 200"):
        wait_until_ok("http://127.0.0.1:9/health", timeout_s=0.3, poll_s=0.05)
