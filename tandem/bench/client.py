"""Open-loop streaming client: sends each request at its scheduled time, never waiting for
responses, and records the time of every streamed chunk.

One asyncio loop, one aiohttp session with unlimited keep-alive connections. The dispatcher sleeps
until a request's scheduled time, starts its task and moves on; while it waits it builds the next
request's body, so the send itself is cheap. `dispatch_lag_s` = actual send - scheduled send is
kept per request: when the client cannot keep up, it shows there rather than silently stretching
the schedule.
"""
from __future__ import annotations

import asyncio
import gc
import json
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import aiohttp

from tandem.bench.prompts import PromptBuilder
from tandem.bench.records import ERROR, RequestRecord
from tandem.bench.traces import BenchRequest

try:  # optional, faster
    import orjson as _orjson

    _loads = _orjson.loads
except ImportError:  # pragma: no cover
    _loads = json.loads

PRIORITY_INT = {"interactive": 0, "standard": 1, "batch": 2}   # vLLM: lower value = served first
_DEAD_STATES = {"stopped", "dead", "failed", "terminated", "exited", "stopping"}


class BenchError(RuntimeError):
    """A problem that stops the benchmark before it starts (bad URL, model, ...)."""


def base_url(url: str) -> str:
    """'http://h:p', 'http://h:p/', 'http://h:p/v1', 'http://h:p/v1/completions' -> 'http://h:p'."""
    u = url.strip().rstrip("/")
    if "://" not in u:
        u = "http://" + u
    for suffix in ("/v1/chat/completions", "/v1/completions", "/v1"):
        if u.endswith(suffix):
            u = u[: -len(suffix)]
            break
    return u


@dataclass
class ClientConfig:
    url: str
    model: str | None = None
    endpoint: str = "completions"             # completions | chat
    ignore_eos: bool = True                   # send ignore_eos + min_tokens = max_tokens
    send_priority: bool | None = None         # None: only if the server is Tandem
    priority_format: str = "name"             # name ("interactive"...) | int (vLLM: 0, 1, 2)
    api_key: str | None = None
    request_timeout: float = 600.0
    temperature: float | None = None
    extra_body: dict = field(default_factory=dict)
    poll_cluster: bool = True
    poll_interval: float = 1.0
    max_concurrency: int | None = None
    start_delay: float = 0.2                  # margin between setup and the first send

    @property
    def base(self) -> str:
        return base_url(self.url)

    @property
    def endpoint_url(self) -> str:
        return self.base + ("/v1/chat/completions" if self.endpoint == "chat" else "/v1/completions")

    def headers(self) -> dict:
        h = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if self.api_key:
            h["Authorization"] = f"Bearer {self.api_key}"
        return h


# ------------------------------------------------------------------------------------ preflight

@dataclass
class ServerInfo:
    models: list[str]
    model: str
    is_tandem: bool
    has_cluster: bool


async def preflight(cfg: ClientConfig) -> ServerInfo:
    """Check the server is reachable, pick/verify the model, detect Tandem (/v1/cluster)."""
    timeout = aiohttp.ClientTimeout(total=10, sock_connect=5)
    base = cfg.base
    try:
        async with aiohttp.ClientSession(timeout=timeout, headers=cfg.headers()) as s:
            models: list[str] = []
            owners: set[str] = set()
            async with s.get(base + "/v1/models") as r:
                if r.status in (401, 403):
                    raise BenchError(f"{base}/v1/models answered {r.status}: pass a valid --api-key")
                if r.status == 200:
                    try:
                        data = await r.json(content_type=None)
                        for m in data.get("data", []):
                            models.append(str(m.get("id")))
                            owners.add(str(m.get("owned_by", "")))
                    except (ValueError, AttributeError, aiohttp.ContentTypeError):
                        pass
            has_cluster = False
            try:
                async with s.get(base + "/v1/cluster") as r:
                    has_cluster = r.status == 200
            except aiohttp.ClientError:
                pass
    except aiohttp.ClientConnectorError as e:
        why = (e.os_error.strerror or str(e.os_error)) if e.os_error else str(e)
        if isinstance(e.os_error, ConnectionRefusedError) or "refused" in why.lower() or \
                "connect call failed" in why.lower():
            why = "connection refused (is the server running on that host and port?)"
        raise BenchError(f"cannot reach {base}: {why}") from None
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
        raise BenchError(f"cannot reach {base}: {type(e).__name__}: {e}") from None
    model = cfg.model
    if model is None:
        if not models:
            raise BenchError(f"{base}/v1/models lists no model; pass --model NAME")
        model = models[0]
    elif models and model not in models:
        raise BenchError(f"model {model!r} is not served by {base}; it serves: {', '.join(models)}")
    is_tandem = has_cluster or "tandem" in owners
    return ServerInfo(models=models, model=model, is_tandem=is_tandem, has_cluster=has_cluster)


def parse_cluster(obj) -> dict:
    """Pool sizes and GPU (worker) count from a /v1/cluster answer; tolerant of missing fields."""
    out: dict = {}
    if not isinstance(obj, dict):
        return out
    pools = obj.get("pools")
    if isinstance(pools, dict):
        out["pools"] = {str(k): int(v) for k, v in pools.items() if isinstance(v, (int, float))}
    workers = obj.get("workers")
    if isinstance(workers, list):
        active = [w for w in workers if isinstance(w, dict)
                  and str(w.get("state", "")).lower() not in _DEAD_STATES]
        out["num_workers"] = len(active)
        if "pools" not in out:
            pools_c: dict[str, int] = {}
            for w in active:
                role = str(w.get("role", "both"))
                pools_c[role] = pools_c.get(role, 0) + 1
            out["pools"] = pools_c
        n = 0.0
        for w in active:
            g = w.get("gpus", w.get("num_gpus", 1))
            n += len(g) if isinstance(g, list) else (g if isinstance(g, (int, float)) else 1)
        out["num_gpus"] = n
    elif "pools" in out:
        out["num_gpus"] = float(sum(out["pools"].values()))
    for key in ("num_gpus", "gpus"):
        if isinstance(obj.get(key), (int, float)) and not isinstance(obj.get(key), bool):
            out["num_gpus"] = float(obj[key])
            break
    return out


# ----------------------------------------------------------------------------------- the runner

class Runner:
    def __init__(self, cfg: ClientConfig, requests: list[BenchRequest], prompts: PromptBuilder,
                 on_update: Callable[["Runner"], None] | None = None):
        self.cfg = cfg
        self.requests = requests
        self.prompts = prompts
        self.on_update = on_update
        self.records: list[RequestRecord] = []
        self.timeline: list[dict] = []
        self.sent = 0
        self.completed = 0
        self.failed = 0
        self.out_tokens = 0
        self.max_lag = 0.0
        self._stopping = False
        self._abort = False
        self.cpu_s = 0.0
        self.t0 = 0.0
        self._send_priority = bool(cfg.send_priority)
        self._base: dict = {}
        self._headers: dict = cfg.headers()

    @property
    def in_flight(self) -> int:
        return self.sent - self.completed - self.failed

    def request_stop(self) -> None:
        """First call (Ctrl-C): send nothing more and let requests in flight finish.
        Second call: abort those too (they are recorded as errors of kind 'cancelled')."""
        if not self._stopping:
            self._stopping = True
            sys.stderr.write(f"\ntandem bench: stopping; waiting for {self.in_flight} requests in flight "
                             f"(Ctrl-C again to abort them)\n")
        else:
            self._abort = True
            sys.stderr.write("\ntandem bench: aborting the requests in flight\n")

    # --------------------------------------------------------------- bodies
    def _prepare_head(self, model: str) -> None:
        c = self.cfg
        base = {"model": model, "stream": True, "stream_options": {"include_usage": True}}
        if c.temperature is not None:
            base["temperature"] = c.temperature
        base.update(c.extra_body)
        self._base = base

    def body(self, req: BenchRequest) -> bytes:
        c = self.cfg
        d = dict(self._base)
        d["max_tokens"] = req.osl
        if c.ignore_eos:
            d["ignore_eos"] = True
            d["min_tokens"] = req.osl
        if self._send_priority:
            d["priority"] = PRIORITY_INT.get(req.priority, 1) if c.priority_format == "int" else req.priority
        head = json.dumps(d, separators=(",", ":"))[:-1]
        if c.endpoint == "chat":
            content = json.dumps(self.prompts.text(req)) if self.prompts.mode == "text" else \
                json.dumps(" ".join(str(i) for i in self.prompts.token_ids(req)))
            return (head + ',"messages":[{"role":"user","content":' + content + "}]}").encode()
        return (head + ',"prompt":' + self.prompts.prompt_json(req) + "}").encode()

    # --------------------------------------------------------------- one request
    async def _one(self, session: aiohttp.ClientSession, rec: RequestRecord, body: bytes,
                   target: float, sem: asyncio.Semaphore | None) -> None:
        if sem is not None:
            await sem.acquire()
        st = time.perf_counter()
        rec.dispatch_lag_s = max(0.0, st - target)
        if rec.dispatch_lag_s > self.max_lag:
            self.max_lag = rec.dispatch_lag_s
        times = rec.token_times_s
        usage = None
        done = False
        n_events = 0
        try:
            async with session.post(self.cfg.endpoint_url, data=body, headers=self._headers) as resp:
                if resp.status != 200:
                    txt = (await resp.text(errors="replace"))[:300]
                    self._fail(rec, f"http_{resp.status}", txt)
                else:
                    content = resp.content
                    buf = b""
                    ended = False
                    while not ended:
                        chunk = await content.readany()
                        if not chunk:
                            break
                        now = time.perf_counter()
                        lines = (buf + chunk).split(b"\n") if buf else chunk.split(b"\n")
                        buf = lines.pop()           # an incomplete last line waits for more bytes
                        for line in lines:
                            if not line.startswith(b"data:"):
                                continue
                            data = line[5:].strip()
                            if not data:
                                continue
                            if data == b"[DONE]":
                                done = ended = True
                                break
                            try:
                                obj = _loads(data)
                            except ValueError:
                                self._fail(rec, "protocol", f"bad SSE data: {data[:100]!r}")
                                ended = True
                                break
                            if not isinstance(obj, dict):
                                continue
                            if "error" in obj or obj.get("object") == "error":
                                self._fail(rec, "stream_error", str(obj.get("error", obj))[:300])
                                ended = True
                                break
                            choices = obj.get("choices")
                            if choices:
                                c0 = choices[0]
                                fr = c0.get("finish_reason")
                                if fr:
                                    rec.finish_reason = fr
                                delta = c0.get("delta")
                                text = c0.get("text") if delta is None else delta.get("content")
                                # an output chunk: text, token ids, or an empty non-final delta
                                # (not the role-only opening chunk of chat streams)
                                if text or c0.get("token_ids") or (
                                        fr is None and not (delta is not None and "role" in delta)):
                                    times.append(now - st)
                                    n_events += 1
                            u = obj.get("usage")
                            if u:
                                usage = u
        except asyncio.TimeoutError:
            self._fail(rec, "timeout", f"no complete answer within {self.cfg.request_timeout} s")
        except asyncio.CancelledError:
            self._fail(rec, "cancelled", "stopped before the answer completed")
        except aiohttp.ClientConnectorError as e:
            self._fail(rec, "connect", str(e)[:300])
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError) as e:
            self._fail(rec, "disconnect", str(e)[:300])
        except aiohttp.ClientError as e:
            self._fail(rec, "client_" + type(e).__name__, str(e)[:300])
        except Exception as e:  # noqa: BLE001 - a record, never a crash of the run
            self._fail(rec, "client_" + type(e).__name__, str(e)[:300])
        finally:
            if sem is not None:
                sem.release()
        rec.e2e_s = time.perf_counter() - st
        if rec.status != ERROR:
            if usage:
                rec.output_tokens = int(usage.get("completion_tokens") or n_events)
                rec.prompt_tokens = usage.get("prompt_tokens")
                det = usage.get("prompt_tokens_details") or {}
                if isinstance(det, dict) and det.get("cached_tokens") is not None:
                    rec.cached_tokens = int(det["cached_tokens"])
            else:
                rec.output_tokens = n_events
            if not times:
                self._fail(rec, "empty_output", "the stream ended without output" +
                           ("" if done else " (and without [DONE])"))
            else:
                rec.ttft_s = times[0]
        if rec.status == ERROR:
            self.failed += 1
        else:
            self.completed += 1
            self.out_tokens += rec.output_tokens

    @staticmethod
    def _fail(rec: RequestRecord, kind: str, msg: str) -> None:
        if rec.status == ERROR:
            return
        rec.status = ERROR
        rec.error_kind = kind
        rec.error = msg
        rec.ttft_s = None

    # --------------------------------------------------------------- timeline
    async def _sampler(self, session: aiohttp.ClientSession) -> None:
        poll = self.cfg.poll_cluster
        url = self.cfg.base + "/v1/cluster"
        tmo = aiohttp.ClientTimeout(total=max(0.5, self.cfg.poll_interval * 0.9))
        fails = 0
        await asyncio.sleep(max(0.0, self.t0 - time.perf_counter()))
        while True:
            entry = {"t_s": round(time.perf_counter() - self.t0, 6), "sent": self.sent,
                     "completed": self.completed, "failed": self.failed,
                     "in_flight": self.in_flight, "output_tokens": self.out_tokens}
            if poll:
                try:
                    async with session.get(url, timeout=tmo) as r:
                        if r.status == 200:
                            entry.update(parse_cluster(await r.json(content_type=None)))
                            fails = 0
                        elif r.status in (404, 405, 501):
                            poll = False           # not a Tandem server: stop asking
                        else:
                            fails += 1
                except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                    fails += 1
                if fails >= 10:
                    poll = False
            self.timeline.append(entry)
            await asyncio.sleep(self.cfg.poll_interval)

    async def _ticker(self) -> None:
        while True:
            try:
                self.on_update(self)
            except Exception:  # noqa: BLE001 - a display problem never stops the run
                pass
            await asyncio.sleep(0.25)

    # --------------------------------------------------------------- main loop
    async def run(self, model: str, send_priority: bool) -> tuple[list[RequestRecord], list[dict]]:
        self._send_priority = send_priority
        self._prepare_head(model)
        self._headers = self.cfg.headers()
        reqs = self.requests
        self.records = [RequestRecord(arrival_s=r.arrival_s, cls=r.cls, priority=r.priority,
                                      isl=r.isl, osl_requested=r.osl, idx=r.idx if r.idx >= 0 else i)
                        for i, r in enumerate(reqs)]
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=30)
        timeout = aiohttp.ClientTimeout(total=self.cfg.request_timeout, sock_connect=10)
        sem = asyncio.Semaphore(self.cfg.max_concurrency) if self.cfg.max_concurrency else None
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGINT, self.request_stop)
            have_sig = True
        except (NotImplementedError, RuntimeError, ValueError):
            have_sig = False
        gc.collect()
        gc.freeze()
        cpu0 = time.process_time()
        tasks: set[asyncio.Task] = set()
        sampler = None
        ticker = asyncio.create_task(self._ticker()) if self.on_update else None
        try:
            async with aiohttp.ClientSession(connector=connector, timeout=timeout,
                                             read_bufsize=1 << 20, auto_decompress=False) as session:
                body = self.body(reqs[0]) if reqs else b""
                self.t0 = time.perf_counter() + self.cfg.start_delay
                sampler = asyncio.create_task(self._sampler(session))
                for i, req in enumerate(reqs):
                    target = self.t0 + req.arrival_s
                    delay = target - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    if self._stopping:
                        break
                    t = asyncio.create_task(self._one(session, self.records[i], body, target, sem))
                    tasks.add(t)
                    t.add_done_callback(tasks.discard)
                    self.sent += 1
                    await asyncio.sleep(0)          # let the new request go out first
                    if i + 1 < len(reqs):
                        body = self.body(reqs[i + 1])
                # unsent requests (stopped early) are dropped from the records
                self.records = self.records[: self.sent]
                while tasks and not self._abort:
                    await asyncio.wait(set(tasks), timeout=0.25)
                if tasks:
                    for t in list(tasks):
                        t.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)
                sampler.cancel()
                await asyncio.gather(sampler, return_exceptions=True)
                sampler = None
                # one last timeline sample at the end of the run
                self.timeline.append({"t_s": round(time.perf_counter() - self.t0, 6),
                                      "sent": self.sent, "completed": self.completed,
                                      "failed": self.failed, "in_flight": self.in_flight,
                                      "output_tokens": self.out_tokens,
                                      **({k: v for k, v in self.timeline[-1].items()
                                          if k in ("pools", "num_gpus", "num_workers")}
                                         if self.timeline else {})})
        finally:
            self.cpu_s = time.process_time() - cpu0
            if sampler is not None:
                sampler.cancel()
            if ticker is not None:
                ticker.cancel()
                await asyncio.gather(ticker, return_exceptions=True)
                self.on_update(self)
            gc.unfreeze()
            if have_sig:
                loop.remove_signal_handler(signal.SIGINT)
        return self.records, self.timeline


async def probe(cfg: ClientConfig, info: ServerInfo, prompts: PromptBuilder,
                send_priority: bool) -> RequestRecord:
    """Send one small request with the run's settings; raise BenchError (with a hint) if it fails."""
    req = BenchRequest(arrival_s=0.0, cls="probe", priority="interactive", isl=16, osl=2, idx=10**9)
    c = ClientConfig(**{**cfg.__dict__, "poll_cluster": False, "start_delay": 0.0,
                        "request_timeout": min(cfg.request_timeout, 120.0)})
    runner = Runner(c, [req], prompts)
    recs, _ = await runner.run(info.model, send_priority)
    r = recs[0]
    if r.ok:
        return r
    hint = ""
    if r.error_kind in ("http_400", "http_422"):
        hints = []
        if prompts.mode == "ids" and cfg.endpoint == "completions":
            hints.append("--prompt-mode text (if it rejects token-id prompts)")
        if cfg.ignore_eos:
            hints.append("--no-ignore-eos (if it rejects ignore_eos/min_tokens)")
        if send_priority:
            hints.append("--no-send-priority or --priority-format int (if it rejects priority)")
        hint = "; try " + ", ".join(hints) if hints else ""
    elif r.error_kind == "http_404":
        hint = "; check --url and --model"
    raise BenchError(f"a test request to {cfg.endpoint_url} failed ({r.error_kind}): "
                     f"{(r.error or '').strip()[:300]}{hint}")


async def run_bench(cfg: ClientConfig, requests: list[BenchRequest], prompts: PromptBuilder, *,
                    on_update=None, info: ServerInfo | None = None
                    ) -> tuple[list[RequestRecord], list[dict], ServerInfo]:
    info = info or await preflight(cfg)
    send_priority = info.is_tandem if cfg.send_priority is None else cfg.send_priority
    runner = Runner(cfg, requests, prompts, on_update)
    records, timeline = await runner.run(info.model, send_priority)
    return records, timeline, info
