#!/usr/bin/env python3
"""Test backend for the xdplb harness: an HTTP/1.1 server (keep-alive) that
answers every GET with its own name, on IPv4 and IPv6.

/client answers with the address the connection came from (what the
server sees as the client: the LB's own address behind full NAT).
/healthz answers with the status last set through /admin/healthz/CODE
(200 at start), so tests can make a backend fail its HTTP health check.
/admin/delay/MS makes every later answer (health checks included) wait MS
milliseconds, so tests can make a backend slow.

With --udp-port, it also answers every UDP datagram to each --udp-address
(the VIPs on lo: bound to them, so that replies come from the VIP) with
its name."""
import argparse
import socket
import threading
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
            elif self.path == "/client":
                text = self.client_address[0].removeprefix("::ffff:")
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


def serve_udp(name, address, port):
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((address, port))
    while True:
        _, client = sock.recvfrom(2048)
        sock.sendto(name.encode(), client)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--port", type=int, default=80)
    parser.add_argument("--udp-port", type=int)
    parser.add_argument("--udp-address", action="append", default=[])
    args = parser.parse_args()
    for address in args.udp_address if args.udp_port else []:
        threading.Thread(target=serve_udp, args=(args.name, address, args.udp_port), daemon=True).start()
    DualStackServer(("::", args.port), handler_for(args.name)).serve_forever()


if __name__ == "__main__":
    main()
