"""A fault-injecting HTTP proxy on 127.0.0.1 in front of the test's S3 endpoint (moto): what a
flaky or failing object store looks like to kmdask's workers, who reach it over real sockets.

Modes (set :attr:`FaultProxy.mode` from the test): ``ok`` forwards every request; ``error``
answers S3's 503 SlowDown; ``slow`` forwards after a delay; ``drop`` closes each connection
without an answer; ``down`` closes the listening socket (connections are refused, as by an
endpoint that is gone) until the mode changes again.
"""

from __future__ import annotations

import http.client
import http.server
import threading
import time
import urllib.parse

_SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
              b"<Message>Please reduce your request rate.</Message></Error>")


class FaultProxy:
    """The proxy: ``with FaultProxy(upstream) as proxy:`` serves on :attr:`url`."""

    def __init__(self, upstream: str, delay: float = 1.0):
        self.upstream = urllib.parse.urlsplit(upstream)
        self._mode = "ok"
        self.delay = delay
        self.counts = {"ok": 0, "error": 0, "slow": 0, "drop": 0}
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet: one line per request otherwise
                pass

            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                mode = proxy.mode
                proxy.counts[mode if mode != "down" else "drop"] += 1
                if mode in ("drop", "down"):
                    self.close_connection = True
                    self.connection.close()
                    return
                if mode == "error":
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(_SLOW_DOWN)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(_SLOW_DOWN)
                    return
                if mode == "slow":
                    time.sleep(proxy.delay)
                conn = http.client.HTTPConnection(proxy.upstream.hostname,
                                                  proxy.upstream.port, timeout=60)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("connection", "keep-alive")}
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("connection", "keep-alive", "transfer-encoding",
                                         "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self._handler = Handler
        self._serve(0)

    def _serve(self, port: int) -> None:
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), self._handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value == "down" and self._mode != "down":
            self._stop()
        elif value != "down" and self._mode == "down":
            self._serve(self.server.server_address[1])  # the same port again
            self._thread.start()
        self._mode = value

    def _stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._mode != "down":
            self._stop()
