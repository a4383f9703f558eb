"""Router: picks the worker for each request (torch-free)."""
from tandem.router.kv_router import (POOLS, KvRouter, RouterConfig, RouterWeights, WorkerView, kv_cost,
                                     pool_roles)

__all__ = ["KvRouter", "RouterConfig", "RouterWeights", "WorkerView", "kv_cost", "POOLS", "pool_roles"]
