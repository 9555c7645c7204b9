"""A scripted OpenAI-compatible judge on 127.0.0.1, for the judge tests and demonstrations.

It answers ``POST /v1/chat/completions`` with a verdict chosen by ``policy`` and ``GET /v1/models``
with one model, and can be told to fail: the first ``fail`` chat requests get ``fail_status``
(with ``Retry-After: 0`` on 429), the first ``slow`` ones wait ``slow_s`` seconds first, the
next ``garbage`` replies are a 200 with a body that is not JSON, and every reply waits
``delay_s``. Every chat request it would answer is logged in ``requests``, on arrival, as
``(question, first answer, second answer)``.

Policies: ``longer`` prefers the longer answer (ties on equal length; consistent in both
orders), ``first`` always prefers the answer shown first (a position-biased judge), ``none``
never gives a verdict in the [[X]] format.

Run alone (stops by itself after ``--seconds``)::

    python tests/support/judge_stub.py --port 8765 --policy longer --seconds 900
"""

from __future__ import annotations

import argparse
import json
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

_PAIR = re.compile(
    r"\[User Question\]\n(.*)\n\n\[The Start of Assistant A's Answer\]\n(.*)\n\[The End of Assistant A's Answer\]"
    r"\n\n\[The Start of Assistant B's Answer\]\n(.*)\n\[The End of Assistant B's Answer\]",
    re.DOTALL,
)


@dataclass
class StubJudge:
    """What the stub does and what it saw (see the module docstring)."""

    policy: str = "longer"
    api_key: str | None = None
    fail: int = 0
    fail_status: int = 500
    slow: int = 0
    slow_s: float = 0.0
    delay_s: float = 0.0
    garbage: int = 0
    requests: list[tuple[str, str, str]] = field(default_factory=list)
    chat_calls: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def verdict(self, first: str, second: str) -> str:
        if self.policy == "first":
            return "[[A]]"
        if self.policy == "none":
            return "Both answers have merits."
        if len(first) == len(second):
            return "[[C]]"
        return "[[A]]" if len(first) > len(second) else "[[B]]"


def _handler(judge: StubJudge) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                # The client gave up (its timeout) before this slow answer was ready.
                pass

        def _authorized(self) -> bool:
            if judge.api_key and self.headers.get("Authorization") != f"Bearer {judge.api_key}":
                self._send(401, json.dumps({"error": {"message": "Incorrect API key provided"}}).encode())
                return False
            return True

        def do_GET(self) -> None:
            if not self._authorized():
                return
            if self.path.rstrip("/").endswith("/models"):
                self._send(200, json.dumps({"object": "list", "data": [{"id": "stub-judge"}]}).encode())
            else:
                self._send(404, b'{"error": {"message": "not found"}}')

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            if not self._authorized():
                return
            if not self.path.rstrip("/").endswith("/chat/completions"):
                self._send(404, b'{"error": {"message": "not found"}}')
                return
            if body.get("model") != "stub-judge":
                self._send(404, json.dumps({"error": {"message": f"model {body.get('model')!r} not found"}}).encode())
                return
            with judge.lock:
                judge.chat_calls += 1
                call = judge.chat_calls
            if call <= judge.slow:
                time.sleep(judge.slow_s)
            if call <= judge.fail:
                headers = {"Retry-After": "0"} if judge.fail_status == 429 else {}
                self._send(judge.fail_status, b'{"error": {"message": "scripted failure"}}', headers)
                return
            if call <= judge.fail + judge.garbage:
                self._send(200, b"<html>upstream proxy error</html>")
                return
            match = _PAIR.search(body["messages"][-1]["content"])
            question, first, second = match.groups() if match else ("", "", "")
            with judge.lock:
                # Logged on arrival: a request whose client is killed while it waits was still asked.
                judge.requests.append((question, first, second))
            time.sleep(judge.delay_s)
            text = f"Comparing the two answers. {judge.verdict(first, second)}"
            reply = {
                "id": f"stub-{call}",
                "object": "chat.completion",
                "model": "stub-judge",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110},
            }
            self._send(200, json.dumps(reply).encode())

    return Handler


@contextmanager
def serve(judge: StubJudge, *, port: int = 0, max_seconds: float = 600.0) -> Iterator[str]:
    """Serve ``judge`` on 127.0.0.1 (``port`` 0: any free one); yields the API base URL.

    The server stops when the block ends, or after ``max_seconds`` whatever happens.
    """
    server = ThreadingHTTPServer(("127.0.0.1", port), _handler(judge))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    deadline = threading.Timer(max_seconds, server.shutdown)
    deadline.daemon = True
    deadline.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        deadline.cancel()
        server.shutdown()
        server.server_close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--policy", choices=("longer", "first", "none"), default="longer")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before every answer")
    parser.add_argument("--seconds", type=float, default=900.0, help="stop after this long")
    args = parser.parse_args()
    judge = StubJudge(policy=args.policy, delay_s=args.delay)
    with serve(judge, port=args.port, max_seconds=args.seconds) as url:
        print(f"stub judge at {url} (model stub-judge) for {args.seconds:g} s", flush=True)
        end = time.monotonic() + args.seconds
        while time.monotonic() < end:
            time.sleep(0.5)
        print(f"stub judge answered {len(judge.requests)} chat requests", flush=True)


if __name__ == "__main__":
    main()
