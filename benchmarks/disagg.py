"""Issue #6 GPU run: KV transfer bandwidth and 1P1D vs aggregated serving on two GPUs.

    python3 benchmarks/disagg.py [--out DIR] [--parts topo,peer,transfer,serve]    # nvidia-h200-x2, 8B
    python3 benchmarks/disagg.py --smoke --out /tmp/d                              # CPU, tiny model, ~30 s

Parts (each bounded in time; a failed part is reported and the next one runs):
  topo      `nvidia-smi topo -m`: how the two GPUs are linked.
  peer      peer-copy bandwidth GPU0→GPU1: `tensor.copy_` in one process, and the same copy between two
            processes through a CUDA IPC handle (one process per GPU, CUDA_VISIBLE_DEVICES as the workers).
  transfer  our transfer layer (the workers' code path): a prefill Engine + TransferAgent on GPU0 holds
            an N-token prompt's KV; a decode Engine on GPU1 fetches it with `fetch_kv` and imports it
            (`add_request(kv_import=...)`). Bandwidth and its ratio to the IPC peer copy (goal >= 0.8);
            the fetched and the imported blocks are checked bitwise (sha256) against the source. Two
            paths: `staged` (TANDEM_KV_DIRECT=0) and `direct` (the workers' default: no staging copy).
  serve     `tandem serve --prefill 1 --decode 1` vs `--workers 2` on the same GPUs with the same
            requests (`tandem bench --workload mixed`, fixed seed, saved once and replayed), plus the
            chat requests alone on 1P1D; one table: chat TTFT/TPOT p99, summarization throughput, chat
            goodput per GPU at SLO TTFT 500 ms / TPOT 50 ms, and the two goal ratios.
Writes DIR/disagg.json (everything), DIR/bench_*.json, DIR/serve_*.log; prints the tables.
The smoke mode runs every part on CPU ("two devices" = two CPU processes) with the tiny model.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GIB = 1 << 30


def log(msg: str) -> None:
    print(f"[{Path(sys.argv[0]).stem} {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sha(t) -> str:
    """sha256 of a tensor's bytes (bitwise identity across processes and devices)."""
    import torch
    return hashlib.sha256(t.detach().contiguous().view(torch.uint8).cpu().numpy().tobytes()).hexdigest()


def child_env(device: str | None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = device
    return env


def spawn(sub: str, args: list[str], device: str | None, stdin=None) -> subprocess.Popen:
    """This script as a child process running subcommand `sub` on one GPU (CUDA_VISIBLE_DEVICES)."""
    return subprocess.Popen([sys.executable, __file__, sub, *args], env=child_env(device), cwd=str(ROOT),
                            stdin=stdin, stdout=subprocess.PIPE, stderr=None, text=True)


def read_json_line(p: subprocess.Popen, timeout_s: float) -> dict:
    """The next stdout line of a child that is JSON (other lines are echoed). A reader thread per child
    feeds a queue, so lines that arrive together are never left waiting in a pipe buffer."""
    import queue
    import threading
    if not hasattr(p, "lines"):
        p.lines = queue.Queue()

        def pump():
            for line in p.stdout:
                p.lines.put(line)
            p.lines.put(None)
        threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"child {p.args[2]} gave no answer in {timeout_s:.0f}s")
        try:
            line = p.lines.get(timeout=left)
        except queue.Empty:
            continue
        if line is None:
            raise RuntimeError(f"child {p.args[2]} exited with {p.wait()}")
        if line.startswith("{"):
            return json.loads(line)
        print("   " + line.rstrip(), flush=True)


def stop(p: subprocess.Popen | None, timeout_s: float = 20) -> None:
    if p is None or p.poll() is not None:
        return
    p.terminate()
    try:
        p.wait(timeout_s)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(10)


# ============================================================================ (a) topology
def part_topo(a) -> dict:
    try:
        r = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True, timeout=30)
        print(r.stdout, flush=True)
        g = subprocess.run(["nvidia-smi", "--query-gpu=index,name,memory.total,driver_version",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        print(g.stdout, flush=True)
        return {"topo": r.stdout, "gpus": g.stdout.strip().splitlines()}
    except FileNotFoundError:
        return {"topo": None, "note": "no nvidia-smi (CPU smoke run)"}


# ============================================================================ (b) peer copy
def _bytes_gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def part_peer(a) -> dict:
    import torch
    n = a.peer_bytes
    out: dict = {"bytes": n}
    if a.device == "cuda":
        if torch.cuda.device_count() < 2:
            raise RuntimeError(f"need 2 GPUs, see {torch.cuda.device_count()}")
        src = torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda:0")
        dst = torch.empty(n, dtype=torch.uint8, device="cuda:1")
        out["can_access_peer"] = bool(torch.cuda.can_device_access_peer(0, 1))
        for _ in range(3):
            dst.copy_(src)
        torch.cuda.synchronize(0), torch.cuda.synchronize(1)
        t0 = time.perf_counter()
        for _ in range(a.peer_reps):
            dst.copy_(src)
        torch.cuda.synchronize(0), torch.cuda.synchronize(1)
        out["same_process_gbps"] = _bytes_gbps(n * a.peer_reps, time.perf_counter() - t0)
        out["same_process_bitwise"] = bool(torch.equal(src, dst.to("cuda:0")))
        del src, dst
        torch.cuda.empty_cache()
    else:                                     # smoke: host memcpy stands in for the GPU link
        src = torch.randint(0, 255, (n,), dtype=torch.uint8)
        dst = torch.empty_like(src)
        t0 = time.perf_counter()
        for _ in range(a.peer_reps):
            dst.copy_(src)
        out["same_process_gbps"] = _bytes_gbps(n * a.peer_reps, time.perf_counter() - t0)
        out["same_process_bitwise"] = bool(torch.equal(src, dst))
    log(f"peer copy in one process: {out['same_process_gbps']:.1f} GB/s ({n / GIB:.2f} GiB x {a.peer_reps})")
    dev0, dev1 = ("0", "1") if a.device == "cuda" else (None, None)
    prod = spawn("_ipc_producer", ["--bytes", str(n), "--device", a.device], dev0, stdin=subprocess.PIPE)
    cons = spawn("_ipc_consumer", ["--reps", str(a.peer_reps), "--device", a.device], dev1, stdin=subprocess.PIPE)
    try:
        msg = read_json_line(prod, 120)
        cons.stdin.write(json.dumps(msg) + "\n")
        cons.stdin.flush()
        res = read_json_line(cons, 120)
        out["ipc_gbps"] = res["gbps"]
        out["ipc_bitwise"] = res["sha"] == msg["sha"]
        log(f"peer copy between two processes (IPC): {res['gbps']:.1f} GB/s, bitwise equal: {out['ipc_bitwise']}")
    finally:
        for p in (cons, prod):
            if p is not None and p.poll() is None:
                try:
                    p.stdin.write("quit\n")
                    p.stdin.flush()
                except (BrokenPipeError, OSError):
                    pass
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    stop(p)
    return out


def _share(t) -> str:
    """A picklable handle of `t` another process can map (CUDA IPC; shared memory file on CPU)."""
    from torch.multiprocessing.reductions import reduce_tensor
    return base64.b64encode(pickle.dumps(reduce_tensor(t))).decode()


def _unshare(s: str):
    fn, args = pickle.loads(base64.b64decode(s))
    return fn(*args)


def cmd_ipc_producer(a) -> None:
    import torch
    torch.multiprocessing.set_sharing_strategy("file_system")
    dev = "cuda" if a.device == "cuda" else "cpu"
    t = torch.randint(0, 255, (a.bytes,), dtype=torch.uint8, device=dev)
    if dev == "cpu":
        t.share_memory_()
    else:
        torch.cuda.synchronize()
    print(json.dumps({"handle": _share(t), "sha": sha(t)}), flush=True)
    sys.stdin.readline()                      # keep the memory alive until the consumer is done


def cmd_ipc_consumer(a) -> None:
    import torch
    torch.multiprocessing.set_sharing_strategy("file_system")
    msg = json.loads(sys.stdin.readline())
    src = _unshare(msg["handle"])
    dst = torch.empty_like(src, device="cuda" if a.device == "cuda" else "cpu")
    for _ in range(3):
        dst.copy_(src)
    if a.device == "cuda":
        torch.cuda.synchronize()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(a.reps):
            dst.copy_(src)
        e1.record()
        e1.synchronize()
        secs = e0.elapsed_time(e1) / 1e3
    else:
        t0 = time.perf_counter()
        for _ in range(a.reps):
            dst.copy_(src)
        secs = time.perf_counter() - t0
    print(json.dumps({"gbps": _bytes_gbps(dst.numel() * a.reps, secs), "sha": sha(dst)}), flush=True)
    del src
    sys.stdin.readline()


# ============================================================================ (c) transfer layer
def _engine(a):
    from tandem.engine.config import EngineConfig
    from tandem.engine.engine import Engine
    cfg = dict(model=a.model, device=a.device, cuda_graphs=False)
    if a.kv_gb:
        cfg["kv_cache_memory_gb"] = a.kv_gb
    return Engine(EngineConfig(**cfg))


def _sync(device: str) -> None:
    if device == "cuda":
        import torch
        torch.cuda.synchronize()


def cmd_kv_prefill(a) -> None:
    """Prefill side: an Engine with the worker's TransferAgent (KVServer); a REP control socket
    prefills prompts on request and holds their KV for the decode side to fetch."""
    import threading
    import random
    import zmq
    from tandem import SamplingParams
    from tandem.transfer.agent import TransferAgent
    eng = _engine(a)
    agent = TransferAgent(eng, threading.Lock())
    ctl = zmq.Context.instance().socket(zmq.REP)
    ctl.bind("tcp://127.0.0.1:*")
    print(json.dumps({"ctl": ctl.getsockopt_string(zmq.LAST_ENDPOINT), "kv": agent.addr}), flush=True)
    vocab = eng.model_config.vocab_size
    while True:
        msg = json.loads(ctl.recv())
        if msg["op"] == "quit":
            ctl.send(b"{}")
            break
        if msg["op"] == "stats":
            ctl.send(json.dumps(vars(agent.server.stats)).encode())
            continue
        r = random.Random(msg["seed"])
        ids = [r.randrange(10, vocab) for _ in range(msg["n"])]
        rid = msg["rid"]
        t0 = time.perf_counter()
        with agent.lock:
            agent.completed()                 # frees the KV of acks that came while the lock was held
            eng.add_request(rid, ids, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True), hold_kv=True)
        while rid in eng.requests:
            with agent.lock:
                eng.step()
        _sync(a.device)
        reply = {"rid": rid, "prefill_s": time.perf_counter() - t0}
        if msg.get("sha"):
            with agent.lock:
                reply["sha"] = sha(eng.export_kv(rid).data)
        ctl.send(json.dumps(reply).encode())
    agent.close()


def _transfer_series(a, eng, ask, mode: str, n: int, seed: int) -> tuple[int, dict]:
    """Warm-up + timed transfers of n-token prompts through one path; the first timed one is checked bitwise."""
    import statistics
    from tandem import SamplingParams
    from tandem.transfer.kv import fetch_kv
    dev = eng.runner.device
    rows = []
    for trial in range(a.warmup + a.trials):
        seed += 1
        check = trial == a.warmup
        pre = ask({"op": "prefill", "rid": f"p-{mode}-{n}-{trial}", "n": n, "seed": seed, "sha": check})
        ph: dict = {}
        _sync(a.device)
        t0 = time.perf_counter()
        got = fetch_kv(a.kv, pre["rid"], 0, timeout_s=60, device=dev, phases=ph, direct=mode == "direct")
        _sync(a.device)
        t1 = time.perf_counter()
        if got is None:
            raise RuntimeError(f"fetch of {n} tokens failed (see the log above)")
        kv, ack = got
        nbytes = kv.data.numel() * kv.data.element_size()
        rid = f"d-{mode}-{n}-{trial}"
        eng.add_request(rid, kv.prompt_token_ids, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True),
                        output_token_ids=kv.output_token_ids, kv_import=kv)
        _sync(a.device)
        t2 = time.perf_counter()
        req = eng.requests[rid]
        row = {"tokens": n, "bytes": nbytes, "fetch_s": t1 - t0, "import_s": t2 - t1, "path": ph.get("path"),
               "block_runs": ph.get("runs"),
               "reply_s": ph.get("reply"), "copy_s": ph.get("copy"),
               "imported": req.num_computed_tokens == kv.num_tokens}
        if check:
            row["fetched_bitwise"] = sha(kv.data) == pre["sha"]
            nblk = -(-kv.num_tokens // kv.block_size)
            row["imported_bitwise"] = sha(eng.runner.read_blocks(req.block_table[:nblk])) == pre["sha"]
        ack()
        eng.abort_request(rid)
        if trial >= a.warmup:
            rows.append(row)
    med = statistics.median(r["fetch_s"] for r in rows)
    med_imp = statistics.median(r["fetch_s"] + r["import_s"] for r in rows)
    res = {"mode": mode, "tokens": n, "bytes": rows[0]["bytes"], "path": rows[0]["path"],
           "fetch_s_median": med, "fetch_gbps": _bytes_gbps(rows[0]["bytes"], med),
           "fetch_import_gbps": _bytes_gbps(rows[0]["bytes"], med_imp),
           "reply_s_median": statistics.median(r["reply_s"] for r in rows),
           "copy_s_median": statistics.median(r["copy_s"] for r in rows),
           "all_imported": all(r["imported"] for r in rows),
           "fetched_bitwise": rows[0].get("fetched_bitwise"), "imported_bitwise": rows[0].get("imported_bitwise"),
           "trials": rows}
    print(f"transfer ({mode}) {n} tokens ({res['bytes'] / GIB:.3f} GiB, {res['path']}): fetch {med * 1e3:.2f} ms = "
          f"{res['fetch_gbps']:.1f} GB/s (reply {res['reply_s_median'] * 1e3:.2f} ms, copy "
          f"{res['copy_s_median'] * 1e3:.2f} ms; block runs {[r.get('block_runs') for r in rows]}); with import {res['fetch_import_gbps']:.1f} GB/s; bitwise "
          f"fetched {res['fetched_bitwise']} imported {res['imported_bitwise']}", flush=True)
    return seed, res


def cmd_kv_decode(a) -> None:
    """Decode side: fetch each held prompt's KV through `fetch_kv` (CUDA IPC on one host) and import it
    into this Engine, timed; the first trial of each size is checked bitwise."""
    import zmq
    eng = _engine(a)
    ctl = zmq.Context.instance().socket(zmq.REQ)
    ctl.connect(a.ctl)

    def ask(m):
        ctl.send(json.dumps(m).encode())
        return json.loads(ctl.recv())

    results = []
    seed = 0
    for mode, n in [(m, int(x)) for m in a.modes.split(",") for x in a.sizes.split(",")]:
        try:
            seed, res = _transfer_series(a, eng, ask, mode, n, seed)
        except Exception as e:  # noqa: BLE001 - keep the other rows (a CUDA fault fails the rest of this process)
            import traceback
            traceback.print_exc()
            res = {"mode": mode, "tokens": n, "error": f"{type(e).__name__}: {e}"}
            seed += a.warmup + a.trials
        results.append(res)
    served = ask({"op": "stats"})
    ask({"op": "quit"})
    try:
        gather = _gather_variants(eng)
    except Exception as e:  # noqa: BLE001 - a diagnostic: never lose the rows above for it
        gather = {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps({"results": results, "served": served, "gather_variants": gather}), flush=True)


def _gather_variants(eng, n_blocks: int = 512, reps: int = 10) -> dict | None:
    """How fast each way of reading n_blocks of the peer's mapped KV cache is (the direct path's
    copy; no ZMQ): per-run contiguous copies (what `copy_blocks` does for few runs), one gather
    kernel over bf16 and over 8-byte words, and one contiguous copy of the same bytes (the link's
    ceiling), for one run of blocks and for every other block. CUDA only (needs a mapped peer)."""
    import torch
    from tandem.transfer.kv import _PEER_CACHES, copy_blocks
    if not _PEER_CACHES:
        return None
    peer = next(iter(_PEER_CACHES.values()))
    n = min(n_blocks, peer.shape[2] // 2 - 1)
    rows = peer.view(peer.shape[0] * peer.shape[1], peer.shape[2], -1)
    nbytes = rows.shape[0] * n * rows.shape[2] * rows.element_size()
    flat = peer.view(-1)
    out: dict = {"blocks": n, "bytes": nbytes}

    def timed(fn) -> float:
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
        return _bytes_gbps(nbytes * reps, time.perf_counter() - t0)

    for name, blocks in (("one_run", list(range(n))), ("every_other", list(range(0, 2 * n, 2)))):
        idx = torch.tensor(blocks, dtype=torch.long, device=peer.device)
        out[name] = {
            "copy_blocks": timed(lambda: copy_blocks(peer, blocks)),
            "index_select_bf16": timed(lambda: peer.index_select(2, idx)),
            "index_select_i64": timed(lambda: rows.view(torch.int64).index_select(1, idx)),
        }
    out["contiguous_copy"] = timed(lambda: flat[:nbytes // flat.element_size()].clone())
    print("gather variants (GB/s over the link, " + f"{n} blocks = {nbytes / GIB:.2f} GiB): "
          + json.dumps({k: v for k, v in out.items() if k not in ("blocks", "bytes")}), flush=True)
    return out


def part_transfer(a, peer: dict | None) -> dict:
    dev0, dev1 = ("0", "1") if a.device == "cuda" else (None, None)
    common = ["--model", a.model, "--device", a.device] + (["--kv-gb", str(a.kv_gb)] if a.kv_gb else [])
    pre = spawn("_kv_prefill", common, dev0)
    dec = None
    try:
        addrs = read_json_line(pre, 180)
        dec = spawn("_kv_decode", common + ["--ctl", addrs["ctl"], "--kv", addrs["kv"], "--sizes", a.sizes,
                                            "--modes", a.modes,
                                            "--trials", str(a.trials), "--warmup", str(a.warmup)], dev1)
        res = read_json_line(dec, 240)
        dec.wait(30)
    finally:
        stop(dec)
        stop(pre)
    ref = (peer or {}).get("ipc_gbps")
    if res.get("gather_variants"):
        log(f"gather variants: {json.dumps(res['gather_variants'])}")
    for r in res["results"]:
        r["ratio_vs_ipc_peer_copy"] = r["fetch_gbps"] / ref if ref and "fetch_gbps" in r else None
    return res


# ============================================================================ (d) serving
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `tandem serve` subprocess in its own process group, logging to a file; always stopped."""

    def __init__(self, a, name: str, pool_args: list[str]):
        import httpx  # noqa: F401  (fail early if missing)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(a.out) / f"serve_{name}.log"
        cmd = [sys.executable, "-m", "tandem.cli", "serve", "--model", a.model, "--served-model-name", "m",
               "--port", str(self.port), "--device", a.device, "--log-level", "warning", *pool_args,
               *a.engine_args.split()]
        self.n_workers = 2
        self.logf = open(self.log_path, "w")
        env = child_env(None)
        if getattr(a, "share_gpu", False):
            env["CUDA_VISIBLE_DEVICES"] = "0,0"   # both workers on GPU 0 (tandem serve gives each "0")
        self.proc = subprocess.Popen(cmd, cwd=str(ROOT), env=env, stdout=self.logf,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout_s: float) -> float:
        import httpx
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log_path}")
            try:
                r = httpx.get(self.url + "/health", timeout=2)
                if r.status_code == 200 and r.json().get("workers_alive", 0) >= self.n_workers:
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server not ready after {timeout_s:.0f}s; see {self.log_path}")

    def cluster(self) -> dict:
        import httpx
        return httpx.get(self.url + "/v1/cluster", timeout=10).json()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)      # workers too, whatever state they are in
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        self.logf.close()


def bench(a, url: str, trace: Path, name: str, extra: list[str] = (), slo: list[str] | None = None) -> dict:
    """Replay `trace` against `url` with `tandem bench`; returns its report (also in DIR/bench_NAME.json)."""
    out = Path(a.out) / f"bench_{name}.json"
    slo = slo if slo is not None else ["--slo", f"chat:{a.slo_ttft_ms}:{a.slo_tpot_ms}"]
    cmd = [sys.executable, "-m", "tandem.cli", "bench", "--url", url, "--model", "m", "--trace", str(trace),
           "--jitter", "0", *slo, "--gpus", "2",
           "--request-timeout", str(a.request_timeout), "--label", name, "--no-progress", "--out", str(out),
           *extra]
    log(f"bench {name}: {' '.join(cmd[3:])}")
    r = subprocess.run(cmd, cwd=str(ROOT), env=child_env(None), capture_output=True, text=True,
                       timeout=a.duration + a.request_timeout + 120)
    print(r.stdout[-3000:], r.stderr[-2000:], flush=True)
    if r.returncode != 0 or not out.exists():
        raise RuntimeError(f"bench {name} exited with {r.returncode}")
    return json.loads(out.read_text())


def parse_levels(spec: str) -> list[tuple[str, float, float]]:
    """"name:chat_rate:summ_rate,..." -> [(name, chat req/s, summarization req/s)]."""
    out = []
    for item in spec.split(","):
        name, c, s = item.split(":")
        out.append((name, float(c), float(s)))
    return out


def save_requests(a, name: str, workload: str, wl: str, seed: int) -> list[dict]:
    """Plan a `tandem bench --workload` run once (fixed seed) and save its requests to
    DIR/requests_NAME.jsonl, so every deployment replays exactly the same requests."""
    path = Path(a.out) / f"requests_{name}.jsonl"
    plan = Path(a.out) / "plan.json"
    cmd = [sys.executable, "-m", "tandem.cli", "bench", "--workload", workload, "--seed", str(seed),
           "--duration", str(a.duration), "--wl", wl, "--dry-run", "--save-requests", str(path),
           "--out", str(plan), "--quiet"]
    r = subprocess.run(cmd, cwd=str(ROOT), env=child_env(None), capture_output=True, text=True, timeout=120)
    if r.returncode != 0 or not path.exists():
        raise RuntimeError(f"planning the workload failed ({r.returncode}): {r.stdout[-1500:]} {r.stderr[-1500:]}")
    plan.unlink(missing_ok=True)
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def make_requests(a, name: str, chat_rate: float, summ_rate: float, seed: int) -> tuple[Path, Path, int, int]:
    """One load level's mixed requests (`tandem bench --workload mixed`), and its chat rows alone."""
    rate, mix = chat_rate + summ_rate, chat_rate / (chat_rate + summ_rate)
    wl = f"rate={rate},mix={mix:.6f}" + (f",{a.wl}" if a.wl else "")
    rows = save_requests(a, name, "mixed", wl, seed)
    chat = Path(a.out) / f"requests_{name}_chat.jsonl"
    chat.write_text("".join(json.dumps(x) + "\n" for x in rows if x.get("class") == "chat"))
    n_chat = sum(1 for x in rows if x.get("class") == "chat")
    log(f"level {name}: {len(rows)} requests ({n_chat} chat) over {a.duration:.0f}s, --wl {wl}, seed {seed}")
    return Path(a.out) / f"requests_{name}.jsonl", chat, len(rows), n_chat


def _m(rep: dict, cls: str) -> dict:
    return (rep.get("summary") or {}).get(cls) or {}


def _q(m: dict, k: str, q: str = "p99"):
    v = m.get(k)
    return v.get(q) if isinstance(v, dict) else None


def part_serve(a, t_end: float) -> dict:
    levels = parse_levels(a.levels)
    out: dict = {"levels": {}, "engine_args": a.engine_args, "disagg_args": a.disagg_args, "runs": {}}
    plan = []                  # (run name, requests file, extra bench flags)
    for i, (name, c, sr) in enumerate(levels):
        mixed, chat, n_all, n_chat = make_requests(a, name, c, sr, a.seed + i)
        out["levels"][name] = {"chat_rate": c, "summarize_rate": sr, "requests": n_all, "chat_requests": n_chat}
        # each level's prompts come from another bench seed, so no run gets prefix hits from an earlier one
        plan.append((f"mixed_{name}", mixed, ["--seed", str(a.seed + i)]))
    # heaviest level first: if time runs short, the lighter levels are what is skipped
    plan.sort(key=lambda r: -out["levels"][r[0][len("mixed_"):]]["summarize_rate"])
    # chat alone: the chat rows of the heaviest level, other token ids (no prefix hits from the mixed runs)
    heavy = max(levels, key=lambda x: x[2])[0]
    chat_alone = (f"chat_alone_{heavy}", Path(a.out) / f"requests_{heavy}_chat.jsonl",
                  ["--token-range", a.alone_token_range])
    out["heaviest_level"] = heavy
    deployments = [("disagg_1p1d", ["--prefill", "1", "--decode", "1", *a.disagg_args.split()],
                    [plan[0], chat_alone] + plan[1:]),
                   ("agg_2w", ["--workers", "2"], plan)]
    run_s = a.duration + 20
    for k, (sname, pool, runs) in enumerate(deployments):
        # keep time for the next deployments' start and heaviest run
        reserve = sum(a.start_timeout / 4 + run_s for _ in deployments[k + 1:])
        if time.monotonic() + a.start_timeout / 4 + run_s + reserve > t_end:
            out["runs"][sname] = {"skipped": "not enough time left"}
            log(f"skipping {sname}: not enough time left")
            continue
        srv = Server(a, sname, pool)
        try:
            ready_s = srv.wait_ready(a.start_timeout)
            log(f"{sname}: ready in {ready_s:.1f}s")
            for rname, trace, extra in runs:
                if time.monotonic() + run_s + reserve > t_end:
                    out["runs"][f"{sname}_{rname}"] = {"skipped": "time budget"}
                    log(f"skipping {sname}_{rname}: not enough time left")
                    continue
                rep = bench(a, srv.url, trace, f"{sname}_{rname}", extra)
                c = srv.cluster()
                out["runs"][f"{sname}_{rname}"] = {
                    "ready_s": ready_s, "summary": rep["summary"],
                    "cluster_totals": c.get("totals"),
                    "workers": [{"id": w["id"], "role": w["role"], "device": w.get("device"),
                                 "transfer": (w.get("stats") or {}).get("transfer"),
                                 "transfer_served": (w.get("stats") or {}).get("transfer_served")}
                                for w in c.get("workers", [])]}
        except Exception as e:  # noqa: BLE001 - report and go on with the next deployment
            log(f"{sname} failed: {type(e).__name__}: {e}")
            out["runs"][sname] = {"error": f"{type(e).__name__}: {e}"}
        finally:
            srv.stop()
    out["table"] = serve_table(out["runs"], [n for n, _, _ in levels], heavy)
    return out


def serve_table(runs: dict, level_names: list[str], heavy: str) -> dict:
    rows = {}
    for name, r in runs.items():
        if "summary" not in r:
            continue
        ch, su = _m(r, "chat"), _m(r, "summarize")
        rows[name] = {"chat_ttft_p99_ms": _q(ch, "ttft_ms"), "chat_tpot_p99_ms": _q(ch, "tpot_ms"),
                      "chat_ttft_p50_ms": _q(ch, "ttft_ms", "p50"), "chat_tpot_p50_ms": _q(ch, "tpot_ms", "p50"),
                      "chat_goodput_per_gpu": ch.get("goodput_per_gpu"), "chat_slo_attainment": ch.get("slo_attainment"),
                      "chat_completed": ch.get("requests_completed"), "chat_failed": ch.get("requests_failed"),
                      "summ_req_per_s": su.get("request_throughput") if su else None,
                      "summ_input_tok_per_s": (su.get("input_tokens", 0) / su["duration_s"])
                      if su and su.get("duration_s") else None,
                      "summ_completed": su.get("requests_completed") if su else None,
                      "summ_failed": su.get("requests_failed") if su else None,
                      "failed_total": _m(r, "overall").get("requests_failed")}
    goals: dict = {}
    for lv in level_names:
        d, g = rows.get(f"disagg_1p1d_mixed_{lv}"), rows.get(f"agg_2w_mixed_{lv}")
        if d and g and d["chat_goodput_per_gpu"] is not None and g["chat_goodput_per_gpu"]:
            goals[f"goodput_ratio_disagg_vs_agg_{lv}"] = d["chat_goodput_per_gpu"] / g["chat_goodput_per_gpu"]
    d, alone = rows.get(f"disagg_1p1d_mixed_{heavy}"), rows.get(f"disagg_1p1d_chat_alone_{heavy}")
    if d and alone and d["chat_tpot_p99_ms"] and alone["chat_tpot_p99_ms"]:
        goals[f"chat_tpot_p99_{heavy}_vs_alone"] = d["chat_tpot_p99_ms"] / alone["chat_tpot_p99_ms"]
    return {"rows": rows, "goals": goals}


# ============================================================================ driver
def fmt(v, nd=1) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def print_tables(res: dict) -> None:
    p, t, s = res.get("peer") or {}, res.get("transfer") or {}, res.get("serve") or {}
    print("\n## KV transfer (issue #6)")
    print(f"peer copy GPU0→GPU1: one process {fmt(p.get('same_process_gbps'))} GB/s, two processes (CUDA IPC) "
          f"{fmt(p.get('ipc_gbps'))} GB/s, bitwise {fmt(p.get('ipc_bitwise'))}")
    print("| mode | prompt tokens | KV bytes | path | fetch ms (median) | GB/s | vs IPC peer copy | GB/s incl. import "
          "| fetched bitwise | imported bitwise |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---|---|")
    for r in t.get("results", []):
        if "error" in r:
            print(f"| {r['mode']} | {r['tokens']} | failed: {r['error']} |")
            continue
        print(f"| {r['mode']} | {r['tokens']} | {r['bytes'] / GIB:.3f} GiB | {r['path']} | {r['fetch_s_median'] * 1e3:.2f} | "
              f"{r['fetch_gbps']:.1f} | {fmt(r.get('ratio_vs_ipc_peer_copy'), 2)} | {r['fetch_import_gbps']:.1f} | "
              f"{fmt(r['fetched_bitwise'])} | {fmt(r['imported_bitwise'])} |")
    tab = s.get("table") or {}
    if tab.get("rows"):
        print("\n## Mixed workload: 1P1D vs 2 aggregated workers, same requests")
        print("| run | chat TTFT p99 ms | chat TPOT p99 ms | chat TTFT p50 | chat TPOT p50 | chat goodput/GPU "
              "(req/s) | chat SLO att. | summ. req/s | summ. prompt tok/s | failed |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for name, r in tab["rows"].items():
            print(f"| {name} | {fmt(r['chat_ttft_p99_ms'])} | {fmt(r['chat_tpot_p99_ms'])} | "
                  f"{fmt(r['chat_ttft_p50_ms'])} | {fmt(r['chat_tpot_p50_ms'])} | {fmt(r['chat_goodput_per_gpu'], 3)} | "
                  f"{fmt(r['chat_slo_attainment'], 3)} | {fmt(r['summ_req_per_s'], 3)} | "
                  f"{fmt(r['summ_input_tok_per_s'], 0)} | {fmt(r['failed_total'])} |")
        for k, v in (tab.get("goals") or {}).items():
            goal = "(goal >= 1.3)" if k.startswith("goodput") else "(goal <= 1.2)"
            print(f"goal: {k} = {fmt(v, 2)} {goal}")
    for k in ("topo", "peer", "transfer", "serve"):
        if isinstance(res.get(k), dict) and res[k].get("error"):
            print(f"part {k} FAILED: {res[k]['error']}")


def _model_complete(d: str) -> bool:
    """`tandem model init` writes the weights index (or the single shard) last."""
    return Path(d, "model.safetensors.index.json").exists() or Path(d, "model.safetensors").exists()


def ensure_model(a) -> None:
    """Use --model if it is a complete model dir, else write a random-weight --preset model there."""
    a.model = a.model or str(Path(a.out) / f"model_{a.preset}")
    if _model_complete(a.model):
        return
    t0 = time.monotonic()
    cmd = [sys.executable, "-m", "tandem.cli", "model", "init", a.model, "--preset", a.preset, "--overwrite"]
    if a.device == "cpu":
        cmd += ["--device", "cpu", "--dtype", "float32"]
    subprocess.run(cmd, cwd=str(ROOT), env=child_env(None), check=True, timeout=600)
    log(f"model {a.preset} written to {a.model} in {time.monotonic() - t0:.1f}s")


def smoke_defaults(a) -> None:
    """Tiny model on CPU; sizes and durations that keep the whole run near 30 s on a shared 2-core box."""
    a.device, a.preset = "cpu", "tiny"
    a.peer_bytes, a.peer_reps = 8 << 20, 3
    a.sizes, a.trials, a.warmup = "64,128", 2, 1
    a.duration, a.request_timeout, a.start_timeout = 2.0, 30, 90
    a.levels = "one:2:2"
    a.wl = "chat_isl=24,chat_osl=12,summarize_isl=160,summarize_osl=4,max_isl=200,max_osl=24"
    a.engine_args = "--max-num-seqs 16 --max-num-batched-tokens 256"
    a.disagg_args = "--local-prefill-max-tokens 16"
    a.alone_token_range = "300:900"


def main_driver(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny model, short runs (CI)")
    ap.add_argument("--out", default=os.environ.get("OUT", "out/disagg"))
    ap.add_argument("--parts", default="topo,peer,transfer,serve")
    ap.add_argument("--preset", default="llama-3.1-8b")
    ap.add_argument("--model", default=None, help="model dir (default: DIR/model_PRESET, created with tandem model init)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--budget-s", type=float, default=480, help="stop starting new parts after this many seconds")
    ap.add_argument("--peer-bytes", type=int, default=GIB)
    ap.add_argument("--peer-reps", type=int, default=10)
    ap.add_argument("--sizes", default="1024,8192", help="prompt tokens per transfer (8B: 8192 tokens = 1 GiB of KV)")
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--modes", default="staged,direct",
                    help="transfer paths: staged (the workers' default: export copy + IPC handle per transfer) "
                         "and direct (the default, TANDEM_KV_DIRECT=1: blocks copied from the peer's mapped KV cache)")
    ap.add_argument("--kv-gb", type=float, default=None, help="KV cache GiB of the transfer-test engines")
    ap.add_argument("--duration", type=float, default=40.0, help="seconds of arrivals per bench run")
    ap.add_argument("--request-timeout", type=float, default=60.0)
    ap.add_argument("--start-timeout", type=float, default=240.0)
    ap.add_argument("--seed", type=int, default=1)
    # chat 6 req/s (256 in, 384 out) with summarization (3,072 in, 128 out) at 10 req/s (~31k prompt tok/s,
    # ~80% of one GPU's 8B prefill rate, profiles/h100_llama-3.1-8b.json) and at 20 req/s (a flood: more
    # than one GPU can prefill, ~80% of two)
    ap.add_argument("--levels", default="moderate:6:10,flood:6:20",
                    help="load levels NAME:CHAT_RATE:SUMMARIZE_RATE,... (each run on both deployments)")
    ap.add_argument("--wl", default="", help="extra workload parameters (tandem bench --wl) for every level")
    ap.add_argument("--engine-args", default="--max-num-seqs 256 --max-num-batched-tokens 2048")
    ap.add_argument("--disagg-args", default="", help="extra flags for the 1P1D server")
    ap.add_argument("--alone-token-range", default="20000:120000")
    ap.add_argument("--slo-ttft-ms", type=float, default=500)
    ap.add_argument("--slo-tpot-ms", type=float, default=50)
    a = ap.parse_args(argv)
    if a.smoke:
        smoke_defaults(a)
    t_start = time.monotonic()
    t_end = t_start + a.budget_s
    Path(a.out).mkdir(parents=True, exist_ok=True)
    res: dict = {"args": vars(a), "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    parts = a.parts.split(",")

    def run_part(name, fn):
        if time.monotonic() > t_end:
            res[name] = {"error": "skipped: time budget spent"}
            return
        t0 = time.monotonic()
        try:
            res[name] = fn()
        except Exception as e:  # noqa: BLE001 - one failed part must not cost the others
            import traceback
            traceback.print_exc()
            res[name] = {"error": f"{type(e).__name__}: {e}"}
        log(f"part {name} took {time.monotonic() - t0:.1f}s")
        Path(a.out, "disagg.json").write_text(json.dumps(res, indent=1, default=str))

    if "topo" in parts:
        run_part("topo", lambda: part_topo(a))
    if "peer" in parts:
        run_part("peer", lambda: part_peer(a))
    if "transfer" in parts or "serve" in parts:
        run_part("model", lambda: ensure_model(a) or {"dir": a.model})
    if "transfer" in parts:
        run_part("transfer", lambda: part_transfer(a, res.get("peer")))
    if "serve" in parts:
        run_part("serve", lambda: part_serve(a, t_end))
    res["wall_s"] = time.monotonic() - t_start
    Path(a.out, "disagg.json").write_text(json.dumps(res, indent=1, default=str))
    print_tables(res)
    log(f"done in {res['wall_s']:.0f}s; results in {a.out}/disagg.json")
    return 1 if any(isinstance(v, dict) and v.get("error") for v in res.values()) else 0


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):
        sub = sys.argv[1]
        ap = argparse.ArgumentParser(prog=f"disagg.py {sub}")
        ap.add_argument("--device", default="cuda")
        ap.add_argument("--bytes", type=int, default=GIB)
        ap.add_argument("--reps", type=int, default=10)
        ap.add_argument("--model")
        ap.add_argument("--kv-gb", type=float, default=None)
        ap.add_argument("--ctl")
        ap.add_argument("--kv")
        ap.add_argument("--sizes", default="8192")
        ap.add_argument("--modes", default="staged")
        ap.add_argument("--trials", type=int, default=5)
        ap.add_argument("--warmup", type=int, default=1)
        a = ap.parse_args(sys.argv[2:])
        {"_ipc_producer": cmd_ipc_producer, "_ipc_consumer": cmd_ipc_consumer,
         "_kv_prefill": cmd_kv_prefill, "_kv_decode": cmd_kv_decode}[sub](a)
        return 0
    return main_driver()


if __name__ == "__main__":
    sys.exit(main())
