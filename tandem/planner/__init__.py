"""The planner: moves GPUs between the prefill and decode pools in real time (torch-free).

Public surface::

    from tandem.planner import (Planner, PlannerConfig, ClusterView, WorkerView, ClassStats,
                                Decision, PerfProfile, load_profile, PlannerLoop, Connector,
                                WindowStats, DynamoBaseline, DynamoConfig)

`Planner.tick(view)` is pure with respect to time (it reads `view.now`), so the simulator drives it
in virtual time and `PlannerLoop` drives it from asyncio in the server.
"""
from tandem.planner.capacity import Demand, Need, PerfProfile, ProfileError, load_profile, workers_needed
from tandem.planner.connector import (Connector, InMemoryConnector, PlannerLoop, apply_decision,
                                      apply_decisions)
from tandem.planner.dynamo_baseline import DynamoBaseline, DynamoConfig
from tandem.planner.planner import Planner
from tandem.planner.predictor import PREDICTORS, make_predictor
from tandem.planner.types import SPILL_PLANNER, ClassStats, ClusterView, Decision, PlannerConfig, WorkerView
from tandem.planner.window import WindowStats

__all__ = ["Planner", "PlannerConfig", "ClusterView", "WorkerView", "ClassStats", "Decision",
           "PerfProfile", "ProfileError", "load_profile", "Demand", "Need", "workers_needed",
           "PlannerLoop", "Connector", "InMemoryConnector", "apply_decision", "apply_decisions",
           "WindowStats", "DynamoBaseline", "DynamoConfig", "PREDICTORS", "make_predictor",
           "SPILL_PLANNER"]
