"""Bounded-memory large runs: lazily replicated requests equal the list version, and the summary
computed from record columns (`--records none`) equals the one computed from the records."""
import math

import pytest

from tandem.bench.traces import finalize
from tandem.sim.run import replicate
from tandem.sim.stream import ReplicatedRequests
from tests.sim.util import random_reqs, run


@pytest.mark.parametrize("shift", ["random", "none"])
def test_replicated_requests_equal_the_list(shift):
    base = random_reqs(60, seed=3, shared=True)
    want = finalize(replicate(base, 7, shift, seed=5))
    got = ReplicatedRequests(base, 7, shift, seed=5)
    assert len(got) == len(want)
    assert [vars(r) for r in got] == [vars(r) for r in want]
    assert vars(got[-1]) == vars(want[-1]) and vars(got[0]) == vars(want[0])


def _close(a, b, path=""):
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9), (path, a, b)
    else:
        assert a == b, (path, a, b)


@pytest.mark.parametrize("extra", [(), ("--slo-ttft-ms", "300", "--slo-tpot-ms", "30", "--max-model-len", "700")])
def test_summary_from_columns_equals_records(profile_dict, extra):
    """Two classes, token times kept (ITL), an SLO and (with a short max model length) failures."""
    reqs = random_reqs(400, seed=1, rate=120.0)
    full, c1 = run(profile_dict, reqs, "--gpus", "2", "--token-times", "all", *extra)
    cols, c2 = run(profile_dict, reqs, "--gpus", "2", "--token-times", "all", "--records", "none", *extra)
    assert c2.columns is not None and len(c2.columns) == 400 and cols["requests"] == []
    if extra:
        assert full["summary"]["overall"]["requests_failed"] > 0
    assert set(full["summary"]) == {"overall", "chat", "batch"}
    _close(cols["summary"], full["summary"])
    _close(cols["client"], full["client"])
    assert cols["config"]["gpu_hours_source"] == full["config"]["gpu_hours_source"]
