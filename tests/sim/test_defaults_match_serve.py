"""`tandem sim` routes and plans with `tandem serve`'s defaults, so a sim run and a real run compare
line by line. A drift here cost 40 points: on the two-H200 bursty run the sim (then: every prompt
prefilled remotely, one prefill worker always kept, planner seats 256) said 97 % for static 1P1D
where the real server got 61 %; with the server's defaults the sim gives 59.5 % (docs/benchmarks.md)."""
from tandem.cli import _planner_config, build_parser
from tandem.sim.cli import build_parser as sim_parser
from tandem.sim.profile import SimProfile
from tandem.sim.run import make_planner


def test_sim_routing_and_planner_defaults_are_the_servers():
    serve = build_parser().parse_args(["serve", "--planner", "--max-num-seqs", "64"])
    sim = sim_parser().parse_args(["--workload", "bursty", "--gpus", "2", "--prefill", "1", "--decode", "1",
                                   "--profile", "synthetic:8b", "--planner", "tandem", "--max-num-seqs", "64",
                                   "--out", "/dev/null"])
    assert sim.local_prefill_tokens == serve.local_prefill_max_tokens == 256
    assert sim.prefill_queue_factor == serve.prefill_queue_factor == 4.0
    assert sim.spill_batch == serve.spill_batch is False
    assert sim.prefill_chunk_while_decoding == serve.prefill_chunk_while_decoding is None
    real = _planner_config(serve, {"max_num_seqs": serve.max_num_seqs}).to_dict()
    _, simulated = make_planner(sim, SimProfile.load("synthetic:8b"), 2)
    for key in ("min_prefill", "min_decode", "max_num_seqs", "tick_s", "min_dwell_s", "cooldown_s",
                "reverse_cooldown_s", "peak_window_s", "donor_memory_s"):
        assert simulated[key] == real[key], key


def test_spill_plans_the_same_in_sim_and_serve():
    """With --spill-batch both apply SPILL_PLANNER (the decode workers carry the edges); a user's
    --planner-set / --planner-arg still wins, and without the queue rule nothing spills."""
    from tandem.planner import SPILL_PLANNER
    sim_args = ["--workload", "bursty", "--gpus", "2", "--prefill", "1", "--decode", "1", "--profile",
                "synthetic:8b", "--planner", "tandem", "--out", "/dev/null"]
    prof = SimProfile.load("synthetic:8b")
    for extra_serve, extra_sim, want in (
            ([], [], SPILL_PLANNER),
            (["--planner-set", "spill_flip_delay_s=5"], ["--planner-arg", "spill_flip_delay_s=5"],
             {**SPILL_PLANNER, "spill_flip_delay_s": 5.0}),
            (["--prefill-queue-factor", "0"], ["--prefill-queue-factor", "0"],
             {"spill_flip_delay_s": 0.0, "hedge_window_s": 300.0})):
        serve = build_parser().parse_args(["serve", "--planner", "--spill-batch", *extra_serve])
        sim = sim_parser().parse_args([*sim_args, "--spill-batch", *extra_sim])
        real = _planner_config(serve, {}).to_dict()
        _, simulated = make_planner(sim, prof, 2)
        for key, value in want.items():
            assert real[key] == simulated[key] == value, key
