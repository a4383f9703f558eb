"""Admission control: batch refused first, interactive last; tickets release once."""
import pytest

from tandem.common.errors import Overloaded
from tandem.frontend.admission import AdmissionController


def test_limits_order_and_release():
    a = AdmissionController(capacity=4, max_waiting=8)
    assert a.limit("batch") == 6 and a.limit("standard") == 8 and a.limit("interactive") == 12
    tickets = [a.admit("interactive") for _ in range(6)]
    with pytest.raises(Overloaded) as ei:
        a.admit("batch")
    assert ei.value.retry_after >= 1 and ei.value.http_status == 429
    tickets += [a.admit("standard"), a.admit("standard")]
    with pytest.raises(Overloaded):
        a.admit("standard")
    tickets += [a.admit("interactive") for _ in range(4)]
    with pytest.raises(Overloaded):
        a.admit("interactive")
    assert a.total_inflight == 12
    for t in tickets:
        a.release(t)
        a.release(t)                      # idempotent
    assert a.total_inflight == 0
    a.admit("batch")
    assert a.snapshot()["rejected"] == {"interactive": 1, "standard": 1, "batch": 1}


def test_capacity_follows_workers():
    a = AdmissionController(capacity=0, max_waiting=0)
    with pytest.raises(Overloaded):
        a.admit("interactive")
    a.set_capacity(2)
    a.admit("interactive")
    a.admit("batch")
    with pytest.raises(Overloaded):
        a.admit("interactive")
