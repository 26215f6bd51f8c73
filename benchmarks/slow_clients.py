"""Slow-body clients against a running server, and a third address's health probes meanwhile.

Each attacker address holds `--per-address` connections that send a request body one byte
every `--trickle-every` seconds (a POST declaring 1000 bytes) and opens a new one whenever the
server closes one, as an attacker would. Another address probes `/health` on a new connection
every half second. Prints a table (probe answers; how the trickling connections ended and how
long the longest lived) and writes JSON. Against a server started with defaults:

    .venv/bin/adapterserve serve --port 8000 &
    .venv/bin/python -P benchmarks/slow_clients.py --url http://127.0.0.1:8000 --seconds 60
"""

from __future__ import annotations

import argparse
import contextlib
import json
import select
import socket
import threading
import time
from collections import Counter

HEAD = (
    "POST /v1/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
    "Content-Length: 1000\r\n\r\n{"
)


class Trickler:
    """`count` trickling connections from `source`, replaced as the server closes them."""

    def __init__(self, host: str, port: int, source: str, count: int, every_s: float) -> None:
        self.target, self.source, self.count, self.every_s = (host, port), source, count, every_s
        self.open: dict[socket.socket, tuple[float, float]] = {}  # -> (opened, last byte sent)
        self.endings: Counter[str] = Counter()
        self.longest_s = 0.0

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(0.2):
            while len(self.open) < self.count and self._connect():
                pass
            now = time.monotonic()
            for sock, (opened, sent) in list(self.open.items()):
                if now - sent >= self.every_s and self._send(sock, b" "):
                    self.open[sock] = (opened, now)
            readable, _, _ = select.select(list(self.open), [], [], 0)
            for sock in readable:
                self._ended(sock)
        for sock in self.open:
            sock.close()
        self.longest_s = max(
            [self.longest_s, *(time.monotonic() - o for o, _ in self.open.values())]
        )

    def _connect(self) -> bool:
        sock = socket.socket()
        try:
            sock.bind((self.source, 0))
            sock.connect(self.target)
            sock.sendall(HEAD.encode())
        except OSError:
            sock.close()
            self.endings["connect failed"] += 1
            return False
        now = time.monotonic()
        self.open[sock] = (now, now)
        return True

    def _send(self, sock: socket.socket, data: bytes) -> bool:
        try:
            sock.send(data)
            return True
        except OSError:
            self._ended(sock)
            return False

    def _ended(self, sock: socket.socket) -> None:
        opened, _ = self.open.pop(sock)
        with contextlib.suppress(OSError):
            data = sock.recv(4096)
            status = data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/") else "closed"
            self.endings[status] += 1
        sock.close()
        self.longest_s = max(self.longest_s, time.monotonic() - opened)


def probe(host: str, port: int, source: str) -> str:
    """GET /health on a new connection from `source`: the status, or why there was none."""
    try:
        with socket.create_connection((host, port), timeout=5, source_address=(source, 0)) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
            data = sock.recv(4096)
        return data.split(b" ", 2)[1].decode() if data else "closed"
    except OSError as e:
        return type(e).__name__


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--attackers", nargs="+", default=["127.0.0.2", "127.0.0.3"])
    parser.add_argument("--per-address", type=int, default=256)
    parser.add_argument("--trickle-every", type=float, default=20.0, help="seconds between bytes")
    parser.add_argument("--prober", default="127.0.0.4")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--json", default="slow_clients.json")
    args = parser.parse_args()
    host, port = args.url.removeprefix("http://").split(":")
    stop = threading.Event()
    tricklers = [
        Trickler(host, int(port), source, args.per_address, args.trickle_every)
        for source in args.attackers
    ]
    threads = [threading.Thread(target=t.run, args=(stop,), daemon=True) for t in tricklers]
    for thread in threads:
        thread.start()
    time.sleep(2)  # the connections are open
    probes: Counter[str] = Counter()
    deadline = time.monotonic() + args.seconds
    while time.monotonic() < deadline:
        probes[probe(host, int(port), args.prober)] += 1
        time.sleep(0.5)
    stop.set()
    for thread in threads:
        thread.join()
    endings = sum((t.endings for t in tricklers), Counter())
    result = {
        "seconds": args.seconds,
        "per_address": args.per_address,
        "attackers": args.attackers,
        "trickle_every_s": args.trickle_every,
        "probes": dict(probes),
        "trickle_endings": dict(endings),
        "longest_trickle_s": round(max(t.longest_s for t in tricklers), 1),
    }
    print(f"| /health from {args.prober} | {dict(probes)} |")
    print(f"| trickling connections ended by | {dict(endings)} |")
    print(f"| longest-lived trickling connection | {result['longest_trickle_s']} s |")
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
