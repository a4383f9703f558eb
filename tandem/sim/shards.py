"""Independent router domains, simulated in parallel processes (`tandem sim --shards K --jobs J`).

One event loop is one core. A thousand busy GPUs are ~15k requests a second, and a Python event
loop spends ~100 us a request, so one loop runs them at ~0.7x real time. A cluster of that size
is not one router in practice either: it is several frontends, each with its own router (and here
its own planner) over its own share of the workers, behind a front load balancer. That is what
`--shards K` simulates:

* the workers are dealt to K domains (each role split as evenly as the counts allow; a domain must
  be servable on its own: prefill workers need a decode-capable worker beside them);
* each request goes to one domain: by its prompt's first prefix block when it has trace `hash_ids`
  (a prefix-affine balancer, so shared prefixes meet in one prefix cache), else uniformly at random
  (seeded: an L4 balancer). Request ids stay the global ones;
* each domain is a whole `SimCluster` (the real router, the real planner with its share of
  `--min-gpus`/`--max-gpus`), run to the end on its own; domain k's seed is `--seed` + k;
* the per-domain results are merged: the request columns (so the summary covers every request
  once), the timelines (summed as step functions), the planner decisions (tagged with the domain).

What it does not model: a router that sees all workers. Load imbalance between domains is real
(random arrivals) and shows in the latency tails. `--shards 1` (the default) is the one-router
cluster, exactly as before. The result depends on K and the seed, never on `--jobs` (tests check).
"""
from __future__ import annotations

import copy
import multiprocessing as mp
import os
import time
from dataclasses import dataclass, replace

import numpy as np

from tandem.sim.stream import RecordColumns, ReplicatedRequests

ROLE_ORDER = ("prefill", "decode", "both")


class ShardError(ValueError):
    """A sharding the run cannot use (reported as bad input)."""


@dataclass
class DomainResult:
    """What one domain's run hands back to the merge (picklable: numbers and columns)."""
    k: int
    roles: list
    requests: int
    columns: RecordColumns | None
    timeline: list
    decisions: list
    planner_config: dict | None
    totals: dict                 # SimCluster.totals() (its leaks keyed "d<k>/<worker>")
    cpu_s: float


# ------------------------------------------------------------------------------------ splitting

def split_roles(roles: list[str], K: int) -> list[list[str]]:
    """Deal each role's workers over K domains, each role going on from where the last one stopped
    (per-role and total counts differ by at most one)."""
    if K > len(roles):
        raise ShardError(f"--shards {K} is more than the {len(roles)} workers")
    out: list[list[str]] = [[] for _ in range(K)]
    i = 0
    for role in ROLE_ORDER:
        for _ in range(roles.count(role)):
            out[i % K].append(role)
            i += 1
    for k, rs in enumerate(out):
        p, d, b = (rs.count(r) for r in ROLE_ORDER)
        if (p and not (d or b)) or (d and not (p or b)):
            raise ShardError(f"--shards {K}: domain {k} would get {p} prefill, {d} decode and {b} both "
                             "workers, which cannot serve a request alone; use fewer shards")
    return out


def split_budget(v: int | None, K: int) -> list[int | None]:
    """A GPU budget (--min-gpus / --max-gpus) dealt like the workers."""
    if v is None:
        return [None] * K
    return [v // K + (1 if k < v % K else 0) for k in range(K)]


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer: a stable integer hash (Python's hash() of a tuple is not one across runs)."""
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def assign(reqs, K: int, seed: int) -> np.ndarray:
    """The domain of every request, in stream order (index = the request's position = its idx)."""
    n = len(reqs)
    rnd = np.random.default_rng((seed ^ 0xD0A1) & 0xFFFFFFFF).integers(0, K, size=n)
    base = getattr(reqs, "base", reqs)
    if not any(r.hash_ids for r in base):
        return rnd
    # prefix-affine: (namespace, first hash id) -> domain; requests without hash ids stay random
    h0 = np.array([r.hash_ids[0] if r.hash_ids else -1 for r in base], dtype=np.int64)
    ns = np.array([r.namespace for r in base], dtype=np.int64)
    if isinstance(reqs, ReplicatedRequests):
        i, copy_no = reqs.base_index()
        ns_all = ns[i] + copy_no * reqs.namespace_stride
        h_all = h0[i]
    else:
        ns_all, h_all = ns, h0
    key = _mix(ns_all.astype(np.uint64) * np.uint64(1_000_003) + h_all.astype(np.uint64))
    dom = (key % np.uint64(K)).astype(np.int64)
    return np.where(h_all >= 0, dom, rnd)


class DomainRequests:
    """The requests of one domain, in arrival order, with their global idx (a lazy view)."""

    def __init__(self, reqs, positions: np.ndarray):
        self.reqs = reqs
        self.positions = positions
        self.base = getattr(reqs, "base", reqs)

    def __len__(self) -> int:
        return len(self.positions)

    def __iter__(self):
        if isinstance(self.reqs, ReplicatedRequests):
            return self.reqs.iter_positions(self.positions)
        return (self.reqs[p] for p in self.positions.tolist())


# ------------------------------------------------------------------------------------ running

_JOB = None          # the parent's job, inherited by forked children (never pickled)


@dataclass
class _Job:
    args: object
    profile: object
    ccfg: object
    reqs: object
    positions: list
    roles: list
    budgets: list
    make_planner: object
    board: object                # per domain (virtual time, requests ended), shared with the children


class Progress:
    """What the CLI's progress line reads (`now`, `sent`, `completed`, `failed`) over all domains:
    the mean of their virtual times (a domain not started yet counts 0, so it grows like the work
    done) and the requests ended in all of them."""

    def __init__(self, board, K: int):
        self.board, self.K = board, K

    @property
    def now(self) -> float:
        return sum(self.board[2 * k] for k in range(self.K)) / self.K

    @property
    def completed(self) -> int:
        return int(sum(self.board[2 * k + 1] for k in range(self.K)))

    sent = completed
    failed = 0


def _run_domain(k: int) -> DomainResult:
    from tandem.sim.cluster import SimCluster
    job = _JOB
    args = copy.copy(job.args)
    args.min_gpus, args.max_gpus = job.budgets[k]
    planner, pcfg = job.make_planner(args, job.profile, len(job.roles[k]))
    cfg = replace(job.ccfg, roles=job.roles[k], seed=job.ccfg.seed + k, keep_records=False)
    sub = DomainRequests(job.reqs, job.positions[k])
    cluster = SimCluster(job.profile, cfg, sub, planner=planner)
    board = job.board

    def tell(c) -> None:             # at each timeline sample (1 s virtual)
        board[2 * k], board[2 * k + 1] = c.now, c.completed + c.failed
    c0 = time.process_time()
    cluster.run(progress=tell)
    tell(cluster)
    cpu = time.process_time() - c0
    totals = cluster.totals()
    totals["leaks"] = {f"d{k}/{w}": v for w, v in totals["leaks"].items()}
    return DomainResult(
        k=k, roles=job.roles[k], requests=len(sub), columns=cluster.columns, timeline=cluster.timeline,
        decisions=[dict(d, domain=k) for d in cluster.decisions], planner_config=pcfg, totals=totals,
        cpu_s=cpu)


def merge_totals(parts: list[DomainResult]) -> dict:
    """The cluster's counters: sums over domains (the latest virtual end; leaks of all domains)."""
    t = [p.totals for p in parts]
    out = {k: sum(x[k] for x in t) for k in ("events", "steps", "win_steps", "preemptions", "gpu_seconds")}
    out.update(virtual=max(x["virtual"] for x in t), leaks={w: v for x in t for w, v in x["leaks"].items()},
               num_kv_blocks=t[0]["num_kv_blocks"])
    dd: dict[str, int] = {}
    for x in t:
        for r, n in x.get("disagg_decisions", {}).items():
            dd[r] = dd.get(r, 0) + n
    out["disagg_decisions"] = dd
    return out


def resolve_jobs(K: int, jobs: int | None) -> int:
    """Processes for K domains: `jobs`, else one per core; never more than K."""
    return max(1, min(K, jobs or _cores()))


def run_domains(args, profile, ccfg, reqs, roles: list[str], K: int, jobs: int,
                make_planner, progress=None) -> list[DomainResult]:
    """Run K domains on `jobs` processes (`resolve_jobs`; forked; 1: in this process, one after
    another); `progress(Progress)` is called about twice a second while they run."""
    global _JOB
    if getattr(args, "max_concurrency", None):
        raise ShardError("--max-concurrency caps one client's requests in flight; it cannot be split "
                         "over --shards (use --shards 1)")
    droles = split_roles(roles, K)
    mins, maxs = split_budget(args.min_gpus, K), split_budget(args.max_gpus, K)
    for k in range(K):
        if mins[k] is not None and mins[k] < 1:
            raise ShardError(f"--min-gpus {args.min_gpus} gives domain {k} no GPU; use fewer shards")
    dom = assign(reqs, K, args.seed)
    positions = [np.flatnonzero(dom == k) for k in range(K)]
    ctx = mp.get_context("fork")
    board = ctx.RawArray("d", 2 * K)
    _JOB = _Job(args, profile, ccfg, reqs, positions, droles, list(zip(mins, maxs)), make_planner, board)
    try:
        if jobs == 1:
            return [_run_domain(k) for k in range(K)]
        with ctx.Pool(jobs, maxtasksperchild=1) as pool:   # a fresh heap per domain
            res = pool.map_async(_run_domain, range(K), chunksize=1)
            while not res.ready():
                res.wait(0.5)
                if progress is not None:
                    progress(Progress(board, K))
            return res.get()
    finally:
        _JOB = None


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover (not Linux)
        return os.cpu_count() or 1


# ------------------------------------------------------------------------------------ merging

def merge_columns(parts: list[RecordColumns]) -> RecordColumns:
    """One RecordColumns holding every domain's requests (class ids renumbered to one map)."""
    out = RecordColumns()
    for p in parts:
        remap = {}
        for name, c in sorted(p.classes.items(), key=lambda x: x[1]):
            remap[c] = out.classes.setdefault(name, len(out.classes))
        for col in ("idx", "arrival", "lag", "ttft", "e2e", "n_out", "isl", "osl", "cached", "ok", "itl"):
            getattr(out, col).extend(getattr(p, col))
        if all(a == b for a, b in remap.items()):
            out.cls.extend(p.cls)
            out.itl_cls.extend(p.itl_cls)
        else:
            out.cls.extend(remap[c] for c in p.cls)
            out.itl_cls.extend(remap[c] for c in p.itl_cls)
        out.errors.update(p.errors)
    return out


_SUM = ("sent", "completed", "failed", "in_flight", "output_tokens", "num_gpus", "num_workers",
        "queued_prefill_tokens", "pending_at_router")


def merge_timelines(tls: list[list[dict]]) -> list[dict]:
    """The cluster-wide timeline: at every sample time of any domain, each domain's latest sample
    (a step function; a finished domain holds its last one) summed; busy and KV usage GPU-weighted."""
    times = sorted({e["t_s"] for tl in tls for e in tl})
    cur = [None] * len(tls)
    pos = [0] * len(tls)
    out = []
    for t in times:
        for d, tl in enumerate(tls):
            while pos[d] < len(tl) and tl[pos[d]]["t_s"] <= t:
                cur[d] = tl[pos[d]]
                pos[d] += 1
        live = [e for e in cur if e is not None]
        tot = {key: sum(e.get(key) or 0 for e in live) for key in _SUM}
        pools: dict = {}
        for e in live:
            for r, v in (e.get("pools") or {}).items():
                pools[r] = pools.get(r, 0) + v
        avg = {}
        for key in ("busy_frac", "kv_usage"):
            xs = [(e[key], e.get("num_gpus") or 0) for e in live if e.get(key) is not None]
            w = sum(g for _, g in xs)
            avg[key] = round(sum(v * g for v, g in xs) / w, 4) if xs and w else None
        out.append({"t_s": t, **{k: tot[k] for k in _SUM[:5]}, "pools": pools,
                    "num_gpus": float(tot["num_gpus"]), "num_workers": tot["num_workers"], **avg,
                    "queued_prefill_tokens": tot["queued_prefill_tokens"],
                    "pending_at_router": tot["pending_at_router"]})
    return out
