#!/usr/bin/env python3
"""Start-up time of Highwater on an existing database (bench/run).

Spawns `highwater serve` RUNS times and measures, each time, from the spawn
to the first 200 answer on /api/v1/health (polled every 0.5 ms over a raw
socket), then stops it with SIGTERM and waits for it to exit.

    startup.py BINARY DATABASE_URL PORT [RUNS]

Prints one line: `startup_ms median=<ms> runs=<ms,ms,...>`.
"""

import signal
import socket
import statistics
import subprocess
import sys
import time

REQUEST = b"GET /api/v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"


def healthy(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(REQUEST)
            head = sock.recv(64)
            return head.startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def once(binary: str, url: str, port: int) -> float:
    command = [binary, "serve", "--listen", f"127.0.0.1:{port}", "--database-url", url, "--log-level", "warn"]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not healthy(port):
            if process.poll() is not None:
                raise SystemExit(f"highwater exited with {process.returncode} before answering")
            if time.perf_counter() - start > 30:
                raise SystemExit("highwater did not answer within 30 s")
            time.sleep(0.0005)
        return (time.perf_counter() - start) * 1000
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main() -> None:
    binary, url, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    runs = int(sys.argv[4]) if len(sys.argv) > 4 else 5
    times = [once(binary, url, port) for _ in range(runs)]
    print(f"startup_ms median={statistics.median(times):.1f} runs={','.join(f'{t:.1f}' for t in times)}")


if __name__ == "__main__":
    main()
