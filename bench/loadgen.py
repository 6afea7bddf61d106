"""A load generator in its own process: C keep-alive HTTP/1.1 clients POST enqueue requests
for a fixed time and report requests/s and latency percentiles as one JSON line.

Raw asyncio streams rather than an HTTP client library: the generator must cost less CPU than
the server it measures (both share this machine's cores)."""

from __future__ import annotations

import asyncio
import json
import sys
import time

from bench.support import percentile


async def client(host: str, port: int, request: bytes, deadline: float,
                 latencies: list[float], statuses: dict[int, int]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            writer.write(request)
            status_line = await reader.readline()
            length = 0
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b""):
                    break
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            latencies.append((time.perf_counter() - started) * 1000)
            status = int(status_line.split()[1])
            statuses[status] = statuses.get(status, 0) + 1
    finally:
        writer.close()
        await writer.wait_closed()


async def main(host: str, port: int, token: str, clients: int, seconds: float) -> None:
    body = json.dumps({"n": 1, "text": "x" * 160}).encode()
    request = (
        f"POST /api/tasks/noop HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    started = time.perf_counter()
    deadline = started + seconds
    await asyncio.gather(*(client(host, port, request, deadline, latencies, statuses)
                           for _ in range(clients)))
    elapsed = time.perf_counter() - started
    print(json.dumps({
        "requests_per_s": len(latencies) / elapsed, "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99), "statuses": statuses,
    }))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]),
                     float(sys.argv[5])))
