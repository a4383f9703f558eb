"""The OpenAI-compatible HTTP API (FastAPI app factory).

Routes: POST /v1/chat/completions, POST /v1/completions (SSE streaming or not), GET /v1/models,
GET /v1/models/{model}, GET /health, GET /metrics (Prometheus), GET /v1/cluster (workers, roles,
queues, router and admission state, planner decisions), and FastAPI's /openapi.json and /docs.

Per request: check the model name, tokenize (chat template for chat), validate against the context
window and KV capacity, build `SamplingParams`, pass admission control (429 + Retry-After), route to a
worker, then stream deltas out as SSE chunks or collect them. A client that disconnects aborts its
request on the worker (freeing its KV blocks).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from tandem.common.errors import ContextTooLong, InvalidParams, TandemError
from tandem.common.sampling import PRIORITIES, SamplingParams
from tandem.frontend.admission import AdmissionController, Ticket
from tandem.frontend.client import EngineClient, RequestHandle
from tandem.frontend.errors import APIError, error_body, install_error_handlers
from tandem.frontend.metrics import Metrics
from tandem.frontend.protocol import (ChatCompletionRequest, ChatCompletionResponse, CompletionRequest,
                                      CompletionResponse, ErrorResponse, ModelCard, ModelList)
from tandem.router.kv_router import NoWorkers
from tandem.worker.protocol import Delta

log = logging.getLogger("tandem.frontend")

MAX_STOP_STRINGS = 16
LOGPROB_FLOOR = -9999.0


@dataclass
class ServerConfig:
    model_dir: str
    served_model_name: str
    model_aliases: tuple[str, ...] = ()
    api_key: str | None = None
    max_waiting: int = 1024                  # admission waiting room (see admission.py)
    default_completion_max_tokens: int = 16  # /v1/completions default, as OpenAI
    worker_wait_s: float = 60.0              # how long a request waits for a first worker before 503
    planner: dict = field(default_factory=lambda: {"enabled": False, "decisions": []})
    extra_info: dict = field(default_factory=dict)


class ServerState:
    """Everything the routes use."""

    def __init__(self, config: ServerConfig, client: EngineClient, runtime=None, tokenizer=None,
                 on_startup: Callable[[], Any] | None = None):
        self.config = config
        self.client = client
        self.runtime = runtime
        self.on_startup = on_startup
        if tokenizer is None:
            from tandem.engine.tokenizer import Tokenizer   # torch-free
            tokenizer = Tokenizer(config.model_dir)
        self.tokenizer = tokenizer
        self.admission = AdmissionController(0, config.max_waiting)
        self.metrics = Metrics(self)
        self.created = int(time.time())
        self.extra: dict = {}                 # for the embedding program (e.g. the uvicorn server)
        self._model_cfg = _read_json(Path(config.model_dir) / "config.json")
        client.on_change = self._workers_changed

    # ------------------------------------------------------------------ model facts (from live workers)
    def _alive(self):
        return self.client.alive_workers()

    @property
    def max_model_len(self) -> int:
        ws = self._alive()
        if ws:
            return min(w.max_model_len for w in ws)
        return int(self._model_cfg.get("max_position_embeddings") or 2048)

    @property
    def vocab_size(self) -> int:
        ws = [w for w in self._alive() if w.vocab_size]
        if ws:
            return min(w.vocab_size for w in ws)
        return int(self._model_cfg.get("vocab_size") or self.tokenizer.vocab_size)

    @property
    def kv_capacity_tokens(self) -> int | None:
        ws = [w for w in self._alive() if w.num_kv_blocks]
        if not ws:
            return None
        return min(w.num_kv_blocks * w.block_size for w in ws)

    def _workers_changed(self) -> None:
        self.admission.set_capacity(sum(w.max_num_seqs for w in self._alive()))

    @lru_cache(maxsize=65536)
    def token_str(self, tid: int) -> str:
        try:
            return self.tokenizer.decode([tid], skip_special_tokens=False)
        except Exception:  # noqa: BLE001
            return ""


def _read_json(p: Path) -> dict:
    try:
        d = json.loads(p.read_text())
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


def _dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _lp(x: float) -> float:
    return x if math.isfinite(x) else LOGPROB_FLOOR


# ====================================================================== ASGI middleware
class FrontMiddleware:
    """Bearer auth for /v1/*, lenient Content-Type for JSON bodies, and request counting by status."""

    def __init__(self, app, state: ServerState):
        self.app = app
        self.state = state
        key = state.config.api_key
        self.expected = f"Bearer {key}".encode() if key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        is_api = path.startswith("/v1/")
        if is_api and scope.get("method") == "POST":
            headers = scope.get("headers") or []
            ct = next((v for k, v in headers if k == b"content-type"), None)
            if ct is None or not (b"json" in ct.lower() or ct.lower().startswith(b"multipart/")):
                scope = dict(scope)
                scope["headers"] = [(k, v) for k, v in headers if k != b"content-type"] + \
                    [(b"content-type", b"application/json")]
        status_holder = {}

        async def _send(msg):
            if msg["type"] == "http.response.start":
                status_holder["status"] = msg["status"]
            await send(msg)

        if is_api and self.expected is not None and scope.get("method") != "OPTIONS":
            auth = next((v for k, v in (scope.get("headers") or []) if k == b"authorization"), b"")
            if not hmac.compare_digest(auth, self.expected):
                resp = JSONResponse(error_body("Invalid API key: pass it as 'Authorization: Bearer <key>'",
                                               "invalid_request_error", None, "invalid_api_key"),
                                    status_code=401, headers={"WWW-Authenticate": "Bearer"})
                await resp(scope, receive, _send)
                self._count(scope, path, 401)
                return
        try:
            await self.app(scope, receive, _send)
        finally:
            if is_api:
                self._count(scope, path, status_holder.get("status", 499))

    def _count(self, scope, path: str, status: int) -> None:
        endpoint = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}.get(path)
        if endpoint is None:
            return
        prio = (scope.get("state") or {}).get("priority") or "none"
        self.state.metrics.requests.labels(endpoint, str(status), prio).inc()


# ====================================================================== request preparation
@dataclass
class SubRequest:
    index: int
    request_id: str
    prompt_ids: list[int]
    prompt_text: str | None
    params: SamplingParams


@dataclass
class Prepared:
    kind: str                     # "chat" | "completions"
    response_id: str
    model: str
    priority: str
    stream: bool
    subs: list[SubRequest]
    include_usage: bool = False
    continuous_usage: bool = False
    return_token_ids: bool = False
    echo: bool = False
    want_logprobs: bool = False
    arrival: float = 0.0
    created: int = 0


class Server:
    def __init__(self, state: ServerState):
        self.state = state

    # ------------------------------------------------------------------ validation helpers
    def check_model(self, model: str | None) -> str:
        cfg = self.state.config
        if model is None or model == "" or model == cfg.served_model_name or model in cfg.model_aliases:
            return cfg.served_model_name
        raise APIError(404, f"The model `{model}` does not exist (this server serves "
                            f"`{cfg.served_model_name}`)", "model_not_found", "model")

    def _encode(self, text: str, special: bool, param: str) -> list[int]:
        try:
            return self.state.tokenizer.encode(text, add_special_tokens=special)
        except TandemError:
            raise
        except Exception as e:  # noqa: BLE001 - e.g. lone surrogates
            raise InvalidParams(f"{param} could not be tokenized: {type(e).__name__}: {e}", param) from None

    def _check_ids(self, ids: list[int], param: str) -> list[int]:
        if not ids:
            raise InvalidParams(f"{param} must contain at least one token", param)
        vocab = self.state.vocab_size
        bad = next((t for t in ids if not isinstance(t, int) or t < 0 or t >= vocab), None)
        if bad is not None:
            raise InvalidParams(f"{param}: token id {bad} is out of range [0, {vocab})", param)
        return ids

    @staticmethod
    def _check_text(s: str, param: str) -> str:
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidParams(f"{param} is not valid UTF-8 text", param) from None
        return s

    def build_params(self, body, kind: str, prompt_len: int) -> SamplingParams:
        if body.n not in (None, 1):
            raise InvalidParams("only n=1 is supported", "n")
        if kind == "completions":
            if body.best_of not in (None, 1):
                raise InvalidParams("only best_of=1 is supported", "best_of")
            if body.suffix:
                raise InvalidParams("suffix is not supported", "suffix")
        if body.presence_penalty not in (None, 0, 0.0):
            raise InvalidParams("presence_penalty is not supported (only 0)", "presence_penalty")
        if body.frequency_penalty not in (None, 0, 0.0):
            raise InvalidParams("frequency_penalty is not supported (only 0)", "frequency_penalty")
        if body.logit_bias:
            raise InvalidParams("logit_bias is not supported", "logit_bias")
        if kind == "chat" and body.response_format is not None and body.response_format.type != "text":
            raise InvalidParams(f"response_format type {body.response_format.type!r} is not supported", "response_format")

        max_len = self.state.max_model_len
        cap = self.state.kv_capacity_tokens
        limit = min(max_len, cap) if cap else max_len
        param = "messages" if kind == "chat" else "prompt"
        where = "in the messages" if kind == "chat" else "in the prompt"
        if kind == "chat":
            max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        else:
            max_tokens = body.max_tokens
        if prompt_len >= limit:
            raise ContextTooLong(
                f"This model's maximum context length is {limit} tokens. However, your request has "
                f"{prompt_len} tokens {where} and at least 1 more is needed for the completion. "
                f"Please reduce the length of the {param}.", param)
        if max_tokens is None:
            max_tokens = limit - prompt_len
            if kind == "completions":
                max_tokens = min(self.state.config.default_completion_max_tokens, max_tokens)
        elif prompt_len + max_tokens > limit:
            raise ContextTooLong(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_len + max_tokens} tokens ({prompt_len} {where}, {max_tokens} in the completion). "
                f"Please reduce the length of the {param} or completion.", param)

        stop = body.stop
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        if len(stop) > MAX_STOP_STRINGS:
            raise InvalidParams(f"at most {MAX_STOP_STRINGS} stop strings are supported", "stop")
        stop = [self._check_text(s, "stop") for s in stop if s != ""]
        stop_ids = list(body.stop_token_ids or [])
        vocab = self.state.vocab_size
        if any(t < 0 or t >= vocab for t in stop_ids):
            raise InvalidParams(f"stop_token_ids must be in [0, {vocab})", "stop_token_ids")
        if kind == "chat":
            logprobs = (body.top_logprobs or 0) if body.logprobs else None
        else:
            logprobs = body.logprobs
        top_p = 1.0 if body.top_p is None else float(body.top_p)
        top_k = body.top_k if body.top_k and body.top_k > 0 else 0
        return SamplingParams(
            max_tokens=int(max_tokens), temperature=1.0 if body.temperature is None else float(body.temperature),
            top_p=top_p if top_p > 0 else 1e-9, top_k=int(top_k), seed=body.seed, stop=stop,
            stop_token_ids=stop_ids, min_tokens=int(body.min_tokens or 0), ignore_eos=bool(body.ignore_eos),
            logprobs=logprobs)

    def prepare_chat(self, body: ChatCompletionRequest) -> Prepared:
        model = self.check_model(body.model)
        msgs = [m.model_dump(exclude_none=True) for m in body.messages]
        for m in msgs:
            c = m.get("content")
            if isinstance(c, str):
                self._check_text(c, "messages")
        kw = {}
        if body.tools:
            kw["tools"] = body.tools
        try:
            text = self.state.tokenizer.apply_chat_template(
                msgs, add_generation_prompt=True if body.add_generation_prompt is None else body.add_generation_prompt,
                **kw)
        except TandemError:
            raise
        except Exception as e:  # noqa: BLE001
            raise InvalidParams(f"messages could not be rendered with the chat template: {e}", "messages") from None
        ids = self._check_ids(self._encode(text, False, "messages"), "messages")
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        params = self.build_params(body, "chat", len(ids))
        return self._prepared("chat", rid, model, body, [SubRequest(0, rid, ids, text, params)])

    def prepare_completion(self, body: CompletionRequest) -> Prepared:
        model = self.check_model(body.model)
        p = body.prompt
        items: list[tuple[list[int], str | None]] = []
        if isinstance(p, str):
            items.append((self._encode(self._check_text(p, "prompt"), True, "prompt"), p))
        elif isinstance(p, list) and p and all(isinstance(x, int) for x in p):
            items.append((list(p), None))
        elif isinstance(p, list) and p:
            for x in p:
                if isinstance(x, str):
                    items.append((self._encode(self._check_text(x, "prompt"), True, "prompt"), x))
                else:
                    items.append((list(x), None))
        else:
            raise InvalidParams("prompt must not be empty", "prompt")
        if len(items) > 64:
            raise InvalidParams("at most 64 prompts per request", "prompt")
        rid = f"cmpl-{uuid.uuid4().hex[:24]}"
        subs = []
        for i, (ids, text) in enumerate(items):
            self._check_ids(ids, "prompt")
            subs.append(SubRequest(i, rid if len(items) == 1 else f"{rid}-{i}", ids, text,
                                   self.build_params(body, "completions", len(ids))))
        prep = self._prepared("completions", rid, model, body, subs)
        prep.echo = bool(body.echo)
        return prep

    def _prepared(self, kind, rid, model, body, subs) -> Prepared:
        so = body.stream_options
        stream = bool(body.stream)
        return Prepared(kind, rid, model, body.priority or "interactive", stream, subs,
                        include_usage=bool(stream and so and so.include_usage),
                        continuous_usage=bool(stream and so and so.include_usage and so.continuous_usage_stats),
                        return_token_ids=bool(body.return_token_ids),
                        want_logprobs=subs[0].params.logprobs is not None)

    # ------------------------------------------------------------------ running
    async def _wait_for_worker(self) -> None:
        client = self.state.client
        if client.alive_workers():
            return
        starting = any(w.state == "starting" for w in client.workers.values())
        if starting and await client.wait_ready(1, timeout=self.state.config.worker_wait_s):
            return
        raise APIError(503, "no worker is available to serve the request", "service_unavailable")

    async def handle(self, prep: Prepared, raw: Request) -> Response:
        st = self.state
        prep.arrival = time.monotonic()
        prep.created = int(time.time())
        raw.state.priority = prep.priority
        await self._wait_for_worker()
        tickets: list[Ticket] = []
        handles: list[RequestHandle] = []
        try:
            for _ in prep.subs:
                tickets.append(st.admission.admit(prep.priority))
            for s in prep.subs:
                handles.append(st.client.submit(s.request_id, s.prompt_ids, s.params.to_dict(), prep.priority,
                                                buffered=not prep.stream))
            planner = st.extra.get("planner")
            if planner is not None:
                for sub in prep.subs:
                    planner.window.on_arrival(prep.arrival, prep.priority, len(sub.prompt_ids))
        except BaseException as e:
            for h in handles:
                h.close()
            for t in tickets:
                st.admission.release(t)
            if isinstance(e, TandemError) and e.http_status == 429:
                st.metrics.rejected.labels(prep.priority).inc()
            if isinstance(e, NoWorkers):
                raise APIError(503, "no worker is available to serve the request", "service_unavailable") from None
            raise
        run = _Run(self, prep, handles, tickets)
        if prep.stream:
            gen = run.sse_chat() if prep.kind == "chat" else run.sse_completions()
            return StreamingResponse(gen, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                              "X-Request-Id": prep.response_id},
                                     background=BackgroundTask(run.cleanup))
        try:
            finals = await _cancel_on_disconnect(raw, run.collect())
        finally:
            run.cleanup()
        if finals is None:
            return Response(status_code=499)
        return JSONResponse(run.final_body(finals), headers={"X-Request-Id": prep.response_id})


async def _cancel_on_disconnect(raw: Request, coro):
    """Run `coro`; if the client disconnects first, cancel it and return None."""
    task = asyncio.ensure_future(coro)

    async def watch():
        while True:
            msg = await raw.receive()
            if msg["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    try:
        await task
    except (asyncio.CancelledError, Exception):  # noqa: BLE001
        pass
    return None


class _Run:
    """One HTTP request's generations: streaming/collecting, response bodies, metrics, cleanup."""

    def __init__(self, server: Server, prep: Prepared, handles: list[RequestHandle], tickets: list[Ticket]):
        self.server = server
        self.st = server.state
        self.prep = prep
        self.handles = handles
        self.tickets = tickets
        n = len(handles)
        self.first_at: list[float | None] = [None] * n
        self.n_out = [0] * n
        self.n_cached = [0] * n
        self.finished = [False] * n
        self.text_offset = [0] * n
        self.prompt_ids_sent: set[int] = set()
        self.cleaned = False

    # ------------------------------------------------------------------ lifecycle
    def cleanup(self) -> None:
        if self.cleaned:
            return
        self.cleaned = True
        m = self.st.metrics
        prio = self.prep.priority
        now = time.monotonic()
        for i, h in enumerate(self.handles):
            h.close()
            if not self.finished[i]:
                m.aborted.labels(prio).inc()
                continue
            if h.retries:
                m.retried.inc(h.retries)
        for t in self.tickets:
            self.st.admission.release(t)
        for i, s in enumerate(self.prep.subs):
            if not self.finished[i]:
                continue
            e2e = now - self.prep.arrival
            m.e2e.labels(prio).observe(e2e)
            m.prompt_tokens.labels(prio).inc(len(s.prompt_ids))
            m.cached_tokens.labels(prio).inc(self.n_cached[i])
            m.generation_tokens.labels(prio).inc(self.n_out[i])
            fa = self.first_at[i]
            tpot = None
            if fa is not None:
                ttft = fa - self.prep.arrival
                m.ttft.labels(prio).observe(ttft)
                if self.n_out[i] > 1:
                    tpot = (e2e - ttft) / (self.n_out[i] - 1)
                    m.tpot.labels(prio).observe(tpot)
            planner = self.st.extra.get("planner")
            if planner is not None:
                planner.window.on_finish(now, prio, self.n_out[i], tpot)

    def _note(self, i: int, d: Delta) -> None:
        if d.new_token_ids and self.first_at[i] is None:
            fa = self.first_at[i] = time.monotonic()
            # the planner's window sees the first token when it happens: reported at the finish
            # (backdated), a chat that streams for longer than the window never showed its TTFT,
            # and the planner read 0 ms TTFT p90 through chat floods on the GPU (session 8)
            planner = self.st.extra.get("planner")
            if planner is not None:
                planner.window.on_first_token(fa, self.prep.priority, fa - self.prep.arrival, d.queue_s)
        self.n_out[i] = d.num_output_tokens or (self.n_out[i] + len(d.new_token_ids))
        self.n_cached[i] = d.num_cached_tokens
        if d.finished:
            self.finished[i] = True
            self.st.metrics.finished.labels(d.finish_reason or "unknown", self.prep.priority).inc()

    async def _iterate(self) -> AsyncIterator[tuple[int, Delta]]:
        hs = self.handles
        if len(hs) == 1:
            async for d in hs[0]:
                yield 0, d
            return
        q: asyncio.Queue = asyncio.Queue()

        async def pump(i, h):
            try:
                async for d in h:
                    q.put_nowait((i, d))
            finally:
                q.put_nowait((i, None))

        tasks = [asyncio.ensure_future(pump(i, h)) for i, h in enumerate(hs)]
        try:
            left = len(hs)
            while left:
                i, d = await q.get()
                if d is None:
                    left -= 1
                    continue
                yield i, d
        finally:
            for t in tasks:
                t.cancel()

    async def collect(self) -> list[Delta]:
        finals: list[Delta | None] = [None] * len(self.handles)
        async for i, d in self._iterate():
            # buffered handles yield one merged delta; TTFT is when the worker's first token arrived
            if self.first_at[i] is None and d.new_token_ids:
                self.first_at[i] = self.handles[i].first_token_at or time.monotonic()
            self._note(i, d)
            finals[i] = d
        for d in finals:
            if d is None:
                raise APIError(500, "generation ended without a final output", "internal_error")
            if d.finish_reason == "error":
                raise APIError(d.error_status or 500, d.error or "generation failed", d.error_code, d.error_param)
        return finals

    # ------------------------------------------------------------------ usage / logprobs
    def usage(self) -> dict:
        p = sum(len(s.prompt_ids) for s in self.prep.subs)
        c = sum(self.n_out)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
                "prompt_tokens_details": {"cached_tokens": sum(self.n_cached)}}

    def chat_logprobs(self, lps: list[dict] | None) -> dict | None:
        if not self.prep.want_logprobs:
            return None
        out = []
        ts = self.st.token_str
        for e in lps or []:
            s = ts(e["token_id"])
            out.append({"token": s, "logprob": _lp(e["logprob"]), "bytes": list(s.encode("utf-8", "replace")),
                        "top_logprobs": [{"token": ts(t), "logprob": _lp(l), "bytes": list(ts(t).encode("utf-8", "replace"))}
                                         for t, l in e.get("top") or []]})
        return {"content": out, "refusal": None}

    def completion_logprobs(self, i: int, lps: list[dict] | None) -> dict | None:
        if not self.prep.want_logprobs:
            return None
        ts = self.st.token_str
        toks, tlps, tops, offs = [], [], [], []
        for e in lps or []:
            s = ts(e["token_id"])
            toks.append(s)
            tlps.append(_lp(e["logprob"]))
            tops.append({ts(t): _lp(l) for t, l in e.get("top") or []})
            offs.append(self.text_offset[i])
            self.text_offset[i] += len(s)
        return {"tokens": toks, "token_logprobs": tlps, "top_logprobs": tops, "text_offset": offs}

    def _echo_text(self, i: int) -> str:
        s = self.prep.subs[i]
        if s.prompt_text is not None:
            return s.prompt_text
        return self.st.tokenizer.decode(s.prompt_ids, skip_special_tokens=False)

    # ------------------------------------------------------------------ non-streaming bodies
    def final_body(self, finals: list[Delta]) -> dict:
        p = self.prep
        if p.kind == "chat":
            d = finals[0]
            choice = {"index": 0, "message": {"role": "assistant", "content": d.new_text},
                      "logprobs": self.chat_logprobs(d.logprobs), "finish_reason": d.finish_reason}
            if p.return_token_ids:
                choice["token_ids"] = list(d.new_token_ids)
            body = {"id": p.response_id, "object": "chat.completion", "created": p.created, "model": p.model,
                    "choices": [choice], "usage": self.usage()}
            if p.return_token_ids:
                body["prompt_token_ids"] = p.subs[0].prompt_ids
            return body
        choices = []
        for i, d in enumerate(finals):
            text = d.new_text
            if p.echo:
                text = self._echo_text(i) + text
            c = {"index": i, "text": text, "logprobs": self.completion_logprobs(i, d.logprobs),
                 "finish_reason": d.finish_reason}
            if p.return_token_ids:
                c["prompt_token_ids"] = p.subs[i].prompt_ids
                c["token_ids"] = list(d.new_token_ids)
            choices.append(c)
        return {"id": p.response_id, "object": "text_completion", "created": p.created, "model": p.model,
                "choices": choices, "usage": self.usage()}

    # ------------------------------------------------------------------ streaming
    def _error_event(self, d: Delta) -> str:
        status = d.error_status or 500
        body = error_body(d.error or "generation failed",
                          "invalid_request_error" if status < 500 else "server_error", d.error_param,
                          d.error_code)
        body["error"]["status"] = status
        return f"data: {_dumps(body)}\n\n"

    def _has_news(self, text: str, d: Delta) -> bool:
        """Whether a delta is worth a chunk: text, the finish, or token ids / logprobs the client asked for."""
        p = self.prep
        return bool(text or d.finished or (p.return_token_ids and d.new_token_ids) or (p.want_logprobs and d.logprobs))

    def _chunk_event(self, base: dict, ch: dict) -> str:
        """One SSE chunk of choice `ch`; with include_usage it carries usage (continuous_usage) or null."""
        chunk = {**base, "choices": [ch]}
        if self.prep.include_usage:
            chunk["usage"] = self.usage() if self.prep.continuous_usage else None
        return f"data: {_dumps(chunk)}\n\n"

    def _end_events(self, base: dict) -> Iterator[str]:
        """The closing events: the usage-only chunk (include_usage, all choices finished), then [DONE]."""
        if self.prep.include_usage and all(self.finished):
            yield f"data: {_dumps({**base, 'choices': [], 'usage': self.usage()})}\n\n"
        yield "data: [DONE]\n\n"

    async def sse_chat(self) -> AsyncIterator[str]:
        p = self.prep
        base = {"id": p.response_id, "object": "chat.completion.chunk", "created": p.created, "model": p.model}
        try:
            first = {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                          "logprobs": None, "finish_reason": None}]}
            if p.return_token_ids:
                first["prompt_token_ids"] = p.subs[0].prompt_ids
            if p.include_usage:
                first["usage"] = None
            yield f"data: {_dumps(first)}\n\n"
            async for i, d in self._iterate():
                self._note(i, d)
                if d.finish_reason == "error":
                    yield self._error_event(d)
                    break
                if not self._has_news(d.new_text, d):
                    continue
                delta = {"content": d.new_text} if d.new_text or not d.finished else {}
                ch = {"index": 0, "delta": delta, "logprobs": self.chat_logprobs(d.logprobs) if d.logprobs else None,
                      "finish_reason": d.finish_reason if d.finished else None}
                if p.return_token_ids:
                    ch["token_ids"] = list(d.new_token_ids)
                yield self._chunk_event(base, ch)
            for ev in self._end_events(base):
                yield ev
        finally:
            self.cleanup()

    async def sse_completions(self) -> AsyncIterator[str]:
        p = self.prep
        base = {"id": p.response_id, "object": "text_completion", "created": p.created, "model": p.model}
        started = [False] * len(self.handles)
        try:
            async for i, d in self._iterate():
                self._note(i, d)
                if d.finish_reason == "error":
                    yield self._error_event(d)
                    break
                text = d.new_text
                if not started[i]:
                    started[i] = True
                    if p.echo:
                        text = self._echo_text(i) + text
                elif not self._has_news(text, d):
                    continue
                ch = {"index": i, "text": text,
                      "logprobs": self.completion_logprobs(i, d.logprobs) if p.want_logprobs else None,
                      "finish_reason": d.finish_reason if d.finished else None}
                if p.return_token_ids:
                    if i not in self.prompt_ids_sent:
                        self.prompt_ids_sent.add(i)
                        ch["prompt_token_ids"] = p.subs[i].prompt_ids
                    ch["token_ids"] = list(d.new_token_ids)
                yield self._chunk_event(base, ch)
            for ev in self._end_events(base):
                yield ev
        finally:
            self.cleanup()


# ====================================================================== the app
_ERR = {400: {"model": ErrorResponse}, 401: {"model": ErrorResponse}, 404: {"model": ErrorResponse},
        429: {"model": ErrorResponse}, 503: {"model": ErrorResponse}}


def create_app(state: ServerState) -> FastAPI:
    server = Server(state)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await state.client.start()
        if state.on_startup is not None:
            r = state.on_startup()
            if asyncio.iscoroutine(r):
                await r
        try:
            yield
        finally:
            await state.client.stop()
            if state.runtime is not None:
                await asyncio.get_running_loop().run_in_executor(None, state.runtime.shutdown)

    app = FastAPI(title="Tandem", version=_version(), lifespan=lifespan,
                  description="OpenAI-compatible LLM serving (Tandem). Extension fields: priority, ignore_eos, "
                              "min_tokens, return_token_ids, top_k, stop_token_ids; prompt may be token ids.")
    app.state.tandem = state
    install_error_handlers(app)

    @app.post("/v1/chat/completions", response_model=None,
              responses={200: {"model": ChatCompletionResponse,
                               "content": {"text/event-stream": {}}}, **_ERR})
    async def chat_completions(body: ChatCompletionRequest, raw: Request):
        if body.priority:
            raw.state.priority = body.priority
        return await server.handle(server.prepare_chat(body), raw)

    @app.post("/v1/completions", response_model=None,
              responses={200: {"model": CompletionResponse, "content": {"text/event-stream": {}}}, **_ERR})
    async def completions(body: CompletionRequest, raw: Request):
        if body.priority:
            raw.state.priority = body.priority
        return await server.handle(server.prepare_completion(body), raw)

    def _card() -> dict:
        c = state.config
        return ModelCard(id=c.served_model_name, created=state.created, root=c.model_dir,
                         max_model_len=state.max_model_len).model_dump()

    @app.get("/v1/models", response_model=ModelList, responses={401: {"model": ErrorResponse}})
    async def models():
        return {"object": "list", "data": [_card()]}

    @app.get("/v1/models/{model:path}", response_model=ModelCard, responses={401: {"model": ErrorResponse},
                                                                              404: {"model": ErrorResponse}})
    async def model_info(model: str):
        server.check_model(model)
        return _card()

    @app.get("/health")
    async def health():
        alive = state.client.alive_workers()
        ok = bool(alive)
        body = {"status": "ok" if ok else ("starting" if any(w.state == "starting" for w in
                                                            state.client.workers.values()) else "unavailable"),
                "workers_alive": len(alive), "workers": len(state.client.workers)}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/cluster")
    async def cluster():
        c = state.client
        workers = []
        for w in c.workers.values():
            d = w.public()
            d["active_requests"] = sorted(h.request_id for h in c.handles.values() if h.worker_id == w.worker_id)
            workers.append(d)
        alive = [w for w in c.workers.values() if w.alive]
        totals = {"workers": len(c.workers), "workers_alive": len(alive),
                  "kv_blocks_used": sum(int(w.stats.get("kv_blocks_used", 0)) for w in alive),
                  "kv_blocks_total": sum(int(w.stats.get("kv_blocks_total", 0)) for w in alive),
                  "running": sum(int(w.stats.get("num_running", 0)) for w in alive),
                  "waiting": {p: sum(int((w.stats.get("num_waiting") or {}).get(p, 0)) for w in alive)
                              for p in PRIORITIES},
                  "requests_in_flight": len(c.handles), "requests_retried": c.num_retried,
                  "worker_deaths": c.num_worker_deaths, "disagg_decisions": dict(c.disagg_decisions),
                  "kv_handoffs": c.num_handoffs, "migrations": c.num_migrations}
        pools = {r: sum(1 for w in alive if w.role == r) for r in ("prefill", "decode", "both")}
        return {"model": state.config.served_model_name, "model_dir": state.config.model_dir,
                "max_model_len": state.max_model_len, "workers": workers, "totals": totals, "pools": pools,
                "router": c.router.snapshot(), "admission": state.admission.snapshot(),
                "planner": state.extra["planner"].snapshot() if state.extra.get("planner") else state.config.planner,
                "runtime": state.runtime.describe() if state.runtime is not None else None,
                **state.config.extra_info}

    app.add_middleware(FrontMiddleware, state=state)
    return app


def _version() -> str:
    try:
        from tandem import __version__
        return __version__
    except Exception:  # noqa: BLE001
        return "0"
