#!/usr/bin/env python3
"""Test backend for the xdplb harness: an HTTP/1.1 server (keep-alive) that
answers every GET with its own name, on IPv4 and IPv6.

/healthz answers with the status last set through /admin/healthz/CODE
(200 at start), so tests can make a backend fail its HTTP health check.
/admin/delay/MS makes every later answer (health checks included) wait MS
milliseconds, so tests can make a backend slow."""
import argparse
import socket
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class DualStackServer(ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True

    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def handler_for(name):
    state = {"healthz": 200, "delay_ms": 0}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            status, text = 200, name
            if self.path.startswith("/admin/healthz/"):
                state["healthz"] = int(self.path.rsplit("/", 1)[1])
                text = f"{name} healthz {state['healthz']}"
            elif self.path.startswith("/admin/delay/"):
                state["delay_ms"] = int(self.path.rsplit("/", 1)[1])
                text = f"{name} delay {state['delay_ms']}"
            else:
                time.sleep(state["delay_ms"] / 1000)
                if self.path == "/healthz":
                    status, text = state["healthz"], f"{name} healthz"
            body = (text + "\n").encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    return Handler


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--port", type=int, default=80)
    args = parser.parse_args()
    DualStackServer(("::", args.port), handler_for(args.name)).serve_forever()


if __name__ == "__main__":
    main()
