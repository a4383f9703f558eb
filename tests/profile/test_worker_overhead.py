"""`EngineProbe.worker_overhead` (what `tandem profile` stores as worker_overhead) on the CPU engine."""
import pytest

pytest.importorskip("zmq")


def test_worker_overhead_measures_step_and_admission(llama_dir):
    from tandem.engine.config import EngineConfig
    from tandem.engine.engine import Engine
    from tandem.profile.measure import EngineProbe
    eng = Engine(EngineConfig(model=llama_dir, device="cpu", max_num_seqs=8, max_model_len=512, num_kv_blocks=200))
    r = EngineProbe(eng).worker_overhead(batches=(1, 4, 4096), ctx=48, steps=3, prompt_tokens=(16, 200, 10000),
                                         repeats=2)
    assert r["batch"] == [1, 4]                       # 4096 sequences do not fit: skipped
    assert r["admission_tokens"] == [16, 200]         # 10,000 tokens exceed the model length: skipped
    assert all(t > 0 for t in r["engine_step_s"] + r["worker_step_s"] + r["admission_s"])
    assert not eng.has_unfinished_requests() and eng.kv.pool.num_free == eng.kv.pool.num_blocks
