"""`profile_cpu`: the CPU profile helper the planner's server test and `benchmarks/planner_gpu.py --smoke` use
must write a profile that both the planner and the simulator load."""
from __future__ import annotations

from tandem.planner.capacity import load_profile
from tandem.profile.profiler import ProfilePlan, profile_cpu
from tandem.sim.profile import SimProfile


def test_profile_cpu_writes_a_profile_planner_and_sim_load(llama_dir, tmp_path):
    plan = ProfilePlan(prefill_tokens=(16, 64), ctx_cached=(0, 32), ctx_new_tokens=16, decode_batches=(1, 2),
                       decode_contexts=(32, 64), decode_steps=1, mixed_points=((16, 1, 32),), repeats=1)
    out = profile_cpu(llama_dir, tmp_path / "cpu.json", plan, command="test", max_num_seqs=4, max_model_len=256)
    assert out == str(tmp_path / "cpu.json")
    perf = load_profile(out)
    assert perf.prefill_time(64) > 0 and perf.decode_step_time(2, 64) > 0
    sim = SimProfile.load(out)
    assert sim.describe()["preset"] == "tiny" and sim.prefill_time(64) > 0 and sim.decode_time(2, 64) > 0
