"""A small OpenAI-compatible streaming server on FastAPI + uvicorn, for the bench end-to-end test.

python fastapi_stub.py --port P [--log FILE] [--fail-every N] [--ttft-ms X] [--itl-ms Y] [--cluster]

Each completion streams max_tokens one-token chunks (SSE), then a usage chunk when
stream_options.include_usage is set, then [DONE]. With --log, one JSON line per completion request
says which fields it carried (so the test can check what the client sent).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import time

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse


def make_app(model: str, ttft_ms: float, itl_ms: float, fail_every: int, log: str | None,
             cluster: bool) -> FastAPI:
    app = FastAPI()
    state = {"n": 0, "t0": time.monotonic()}
    logf = open(log, "a", buffering=1) if log else None

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model, "object": "model", "owned_by": "fastapi-stub"}]}

    if cluster:
        @app.get("/v1/cluster")
        async def cluster_info():
            k = int(time.monotonic() - state["t0"])
            return {"workers": [{"id": "p0", "role": "prefill", "state": "running"},
                                {"id": "d0", "role": "decode", "state": "running"},
                                {"id": "d1", "role": "decode", "state": "running" if k % 2 else "stopped"}]}

    async def handle(req: Request, chat: bool):
        state["n"] += 1
        n = state["n"]
        body = await req.json()
        prompt = body.get("prompt") if not chat else body["messages"][-1]["content"]
        n_in = len(prompt) if isinstance(prompt, list) else len(str(prompt).split())
        if logf:
            logf.write(json.dumps({
                "n": n, "keys": sorted(body), "prompt_is_ids": isinstance(prompt, list),
                "prompt_len": n_in, "prompt_head": prompt[:1024] if isinstance(prompt, list) else None,
                "max_tokens": body.get("max_tokens"), "min_tokens": body.get("min_tokens"),
                "ignore_eos": body.get("ignore_eos"), "priority": body.get("priority"),
                "stream": body.get("stream"), "include_usage": (body.get("stream_options") or {}).get("include_usage"),
            }) + "\n")
        if body.get("model") != model:
            return JSONResponse({"error": {"message": "model not found"}}, status_code=404)
        if fail_every and n % fail_every == 0:
            return JSONResponse({"error": {"message": "injected failure"}}, status_code=500)
        n_out = int(body.get("max_tokens") or 16)
        usage = bool((body.get("stream_options") or {}).get("include_usage"))
        obj = "chat.completion.chunk" if chat else "text_completion"

        async def gen():
            if chat:   # like OpenAI: a role-only chunk first, which is not an output token
                ch = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                yield f"data: {json.dumps({'id': f'c{n}', 'object': obj, 'model': model, 'choices': [ch]})}\n\n"
            await asyncio.sleep(ttft_ms / 1e3)
            for i in range(n_out):
                last = i == n_out - 1
                if chat:
                    ch = {"index": 0, "delta": {"content": f" w{i}"}, "finish_reason": "length" if last else None}
                else:
                    ch = {"index": 0, "text": f" w{i}", "finish_reason": "length" if last else None}
                yield f"data: {json.dumps({'id': f'c{n}', 'object': obj, 'model': model, 'choices': [ch]})}\n\n"
                if not last:
                    await asyncio.sleep(itl_ms / 1e3)
            if usage:
                u = {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}
                yield f"data: {json.dumps({'id': f'c{n}', 'object': obj, 'model': model, 'choices': [], 'usage': u})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(gen(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(req: Request):
        return await handle(req, False)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: Request):
        return await handle(req, True)

    return app


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--model", default="stub-model")
    ap.add_argument("--ttft-ms", type=float, default=8.0)
    ap.add_argument("--itl-ms", type=float, default=3.0)
    ap.add_argument("--fail-every", type=int, default=0)
    ap.add_argument("--log", default=None)
    ap.add_argument("--cluster", action="store_true")
    a = ap.parse_args()
    uvicorn.run(make_app(a.model, a.ttft_ms, a.itl_ms, a.fail_every, a.log, a.cluster),
                host="127.0.0.1", port=a.port, log_level="warning")
