"""`tandem sim`: the real router and planner over simulated engines, in virtual time (torch-free).

* `tandem.sim.profile`  — perf profile loader and the step-time model;
* `tandem.engine.sim_engine` — the simulated engine (real scheduler / KV cache, timed forward);
* `tandem.sim.cluster`  — the discrete-event cluster (workers, router, transfers, planner, connector);
* `tandem.sim.run`, `tandem.sim.cli` — request planning, the report, the command line.
"""
