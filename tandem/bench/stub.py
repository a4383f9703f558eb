"""A fake OpenAI-compatible streaming server, for testing the bench client and measuring its
overhead: `python -m tandem.bench.stub --port 0` prints ``READY <port>`` once listening.

Plain asyncio HTTP/1.1 (keep-alive, chunked SSE), so it costs little CPU per request and does not
become the bottleneck of a client-overhead test. Each completion streams `max_tokens` chunks of one
token: the first after --ttft-ms, the rest --itl-ms apart, then a usage chunk and ``[DONE]``.
--fail-every N answers every Nth completion with HTTP 500; --cluster serves a fake /v1/cluster.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time


class Stub:
    def __init__(self, model: str = "stub", ttft_ms: float = 5.0, itl_ms: float = 2.0,
                 fail_every: int = 0, cluster: bool = False, max_tokens_cap: int = 100000):
        self.model = model
        self.ttft = ttft_ms / 1e3
        self.itl = itl_ms / 1e3
        self.fail_every = fail_every
        self.cluster = cluster
        self.cap = max_tokens_cap
        self.n = 0
        self.t_start = time.monotonic()

    # ------------------------------------------------------------------ http plumbing
    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    break
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {}
                for ln in lines[1:]:
                    if ":" in ln:
                        k, v = ln.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                n = int(headers.get("content-length", "0") or 0)
                body = await reader.readexactly(n) if n else b""
                keep = headers.get("connection", "").lower() != "close"
                await self.route(method, path.split("?", 1)[0], body, writer)
                if not keep:
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            try:
                writer.close()
            except Exception:  # noqa: BLE001
                pass

    @staticmethod
    def _send(writer, status: int, obj) -> None:
        data = json.dumps(obj).encode()
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 500: "Internal Server Error"}.get(status, "X")
        writer.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(data)}\r\n\r\n".encode() + data)

    async def route(self, method: str, path: str, body: bytes, writer) -> None:
        if method == "GET" and path == "/health":
            self._send(writer, 200, {"status": "ok"})
        elif method == "GET" and path == "/v1/models":
            self._send(writer, 200, {"object": "list", "data": [
                {"id": self.model, "object": "model", "owned_by": "stub"}]})
        elif method == "GET" and path == "/v1/cluster" and self.cluster:
            k = int(time.monotonic() - self.t_start) % 4
            self._send(writer, 200, {"workers": [
                {"id": "w0", "role": "prefill", "state": "running"},
                {"id": "w1", "role": "decode", "state": "running"},
                {"id": "w2", "role": "decode" if k < 2 else "prefill", "state": "running"}],
            })
        elif method == "POST" and path in ("/v1/completions", "/v1/chat/completions"):
            await self.complete(path.endswith("chat/completions"), body, writer)
        else:
            self._send(writer, 404, {"error": {"message": f"no route {method} {path}"}})
        await writer.drain()

    # ------------------------------------------------------------------ completions
    async def complete(self, chat: bool, body: bytes, writer) -> None:
        self.n += 1
        try:
            req = json.loads(body)
        except ValueError:
            self._send(writer, 400, {"error": {"message": "bad JSON"}})
            return
        if self.fail_every and self.n % self.fail_every == 0:
            self._send(writer, 500, {"error": {"message": "injected failure"}})
            return
        if req.get("model") != self.model:
            self._send(writer, 404, {"error": {"message": f"model {req.get('model')!r} not found"}})
            return
        n_out = max(1, min(int(req.get("max_tokens") or 16), self.cap))
        prompt = req.get("prompt") if not chat else req.get("messages", [{}])[-1].get("content", "")
        n_in = len(prompt) if isinstance(prompt, list) else len(str(prompt).split())
        rid = f"cmpl-{self.n}"
        if not req.get("stream"):
            await asyncio.sleep(self.ttft + self.itl * (n_out - 1))
            self._send(writer, 200, {"id": rid, "object": "text_completion", "model": self.model,
                                     "choices": [{"index": 0, "text": " x" * n_out, "finish_reason": "length"}],
                                     "usage": {"prompt_tokens": n_in, "completion_tokens": n_out,
                                               "total_tokens": n_in + n_out}})
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n")

        def event(obj) -> None:
            data = b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n"
            writer.write(b"%x\r\n%s\r\n" % (len(data), data))

        obj_name = "chat.completion.chunk" if chat else "text_completion"
        await asyncio.sleep(self.ttft)
        for i in range(n_out):
            last = i == n_out - 1
            if chat:
                delta = {"content": f" t{i}"}
                if i == 0:
                    delta["role"] = "assistant"
                choice = {"index": 0, "delta": delta, "finish_reason": "length" if last else None}
            else:
                choice = {"index": 0, "text": f" t{i}", "finish_reason": "length" if last else None}
            event({"id": rid, "object": obj_name, "model": self.model, "choices": [choice]})
            await writer.drain()
            if not last and self.itl > 0:
                await asyncio.sleep(self.itl)
        if (req.get("stream_options") or {}).get("include_usage"):
            event({"id": rid, "object": obj_name, "model": self.model, "choices": [],
                   "usage": {"prompt_tokens": n_in, "completion_tokens": n_out,
                             "total_tokens": n_in + n_out}})
        event(b"[DONE]")
        writer.write(b"0\r\n\r\n")


async def serve(host: str, port: int, stub: Stub, ready=None) -> None:
    server = await asyncio.start_server(stub.handle, host, port, backlog=4096)
    actual = server.sockets[0].getsockname()[1]
    if ready is not None:
        ready(actual)
    async with server:
        await server.serve_forever()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tandem.bench.stub", description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--model", default="stub")
    ap.add_argument("--ttft-ms", type=float, default=5.0)
    ap.add_argument("--itl-ms", type=float, default=2.0)
    ap.add_argument("--fail-every", type=int, default=0)
    ap.add_argument("--cluster", action="store_true")
    a = ap.parse_args(argv)
    stub = Stub(a.model, a.ttft_ms, a.itl_ms, a.fail_every, a.cluster)

    def ready(port):
        print(f"READY {port}", flush=True)
    try:
        asyncio.run(serve(a.host, a.port, stub, ready))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
