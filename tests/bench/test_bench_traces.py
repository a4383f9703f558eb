"""Trace readers on the real shared files, and the slicing/scaling/capping pipeline."""
import math

import pytest

from tandem.bench import traces as tr


def test_azure_conv(traces_dir):
    reqs = tr.read_trace(str(traces_dir / "azure2023_conv_181546-184500.csv"))
    assert len(reqs) == 9754
    r0, r1 = reqs[0], reqs[1]
    assert (r0.arrival_s, r0.isl, r0.osl, r0.cls, r0.priority) == (0.0, 374, 44, "conv", "interactive")
    # 18:15:50.9951690 - 18:15:46.6805900
    assert r1.arrival_s == pytest.approx(4.314579, abs=1e-6)
    assert (r1.isl, r1.osl) == (396, 109)
    assert reqs[-1].arrival_s == pytest.approx(1753.2571, abs=1e-3)   # 18:44:59.93773 - start
    assert all(b.arrival_s >= a.arrival_s for a, b in zip(reqs, reqs[1:]))
    assert all(r.hash_ids == [] for r in reqs[:100])


def test_azure_code(traces_dir):
    reqs = tr.read_trace(str(traces_dir / "azure2023_code_181703-184500.csv"))
    assert len(reqs) == 5100
    assert (reqs[0].isl, reqs[0].osl, reqs[0].cls) == (4808, 10, "code")
    assert reqs[1].arrival_s == pytest.approx(0.052, abs=1e-6)
    assert max(r.isl for r in reqs) == 7437


def test_mooncake(traces_dir):
    reqs = tr.read_trace(str(traces_dir / "mooncake_fast25_conversation_0-30min.jsonl"))
    assert len(reqs) == 5719
    assert reqs[0].cls == "mooncake"
    assert reqs[0].hash_ids[:3] == [0, 1, 2] and reqs[0].isl == 6758 and reqs[0].osl == 500
    assert all(len(r.hash_ids) == math.ceil(r.isl / 512) for r in reqs[:500])
    assert all(r.block_size == 512 for r in reqs[:10])
    assert reqs[-1].arrival_s == pytest.approx(1797.0)


def test_trace_spec_and_class_override(traces_dir):
    p = str(traces_dir / "azure2023_code_181703-184500.csv")
    path, cls, prio = tr.parse_trace_spec(p + "#summ:batch")
    assert (path, cls, prio) == (p, "summ", "batch")
    assert tr.parse_trace_spec(p) == (p, None, "interactive")
    reqs = tr.read_trace(path, cls=cls, priority=prio)
    assert {(r.cls, r.priority) for r in reqs[:50]} == {("summ", "batch")}
    with pytest.raises(tr.TraceError, match="priority"):
        tr.read_trace(p, priority="urgent")


def test_prepare_slice_scale_cap(traces_dir):
    raw = tr.read_trace(str(traces_dir / "mooncake_fast25_conversation_0-30min.jsonl"))
    out = tr.prepare_trace(raw, time_scale=0.5, duration_s=30.0, max_isl=1000, max_osl=50)
    src = [r for r in raw if r.arrival_s * 0.5 < 30.0]
    assert len(out) == len(src)
    assert all(r.arrival_s < 30.0 for r in out)
    for a, b in zip(out, src):
        assert a.arrival_s == pytest.approx(b.arrival_s * 0.5)
        assert a.isl == min(b.isl, 1000) and a.osl == min(b.osl, 50)
        assert a.hash_ids == b.hash_ids[: math.ceil(a.isl / 512)]     # shared prefixes kept
    # start offset + max requests
    out = tr.prepare_trace(raw, start_s=60.0, max_requests=10)
    assert len(out) == 10
    assert out[0].arrival_s == pytest.approx(next(r.arrival_s for r in raw if r.arrival_s >= 60) - 60)


def test_jitter_is_seeded_and_bounded(traces_dir):
    raw = tr.read_trace(str(traces_dir / "mooncake_fast25_conversation_0-30min.jsonl"))[:200]
    a = tr.prepare_trace(raw, jitter_s=3.0, seed=1)
    b = tr.prepare_trace(raw, jitter_s=3.0, seed=1)
    c = tr.prepare_trace(raw, jitter_s=3.0, seed=2)
    assert [r.arrival_s for r in a] == [r.arrival_s for r in b]
    assert [r.arrival_s for r in a] != [r.arrival_s for r in c]
    assert len({r.arrival_s for r in a}) == len(a)        # the 3 s ticks are spread out
    assert all(r.arrival_s >= 0 for r in a)


def test_auto_jitter_detects_quantized_ticks(traces_dir):
    from tandem.bench.cli import _auto_jitter
    moon = tr.read_trace(str(traces_dir / "mooncake_fast25_conversation_0-30min.jsonl"))
    conv = tr.read_trace(str(traces_dir / "azure2023_conv_181546-184500.csv"))
    assert _auto_jitter(moon) == pytest.approx(3.0, abs=0.01)
    assert _auto_jitter(conv) == 0.0


def test_classify_by_shape_and_merge(traces_dir):
    conv = tr.prepare_trace(tr.read_trace(str(traces_dir / "azure2023_conv_181546-184500.csv")),
                            max_requests=300, classify="shape", shape_ratio=4.0)
    assert {r.cls for r in conv} == {"chat", "summarize"}
    for r in conv:
        assert (r.cls == "summarize") == (r.isl >= 4 * r.osl)
        assert r.priority == ("batch" if r.cls == "summarize" else "interactive")
    code = tr.prepare_trace(tr.read_trace(str(traces_dir / "azure2023_code_181703-184500.csv")),
                            max_requests=100)
    both = tr.finalize(tr.merge(conv, code))
    assert len(both) == 400
    assert [r.idx for r in both] == list(range(400))
    assert {r.namespace for r in both} == {0, 1}
    assert all(b.arrival_s >= a.arrival_s for a, b in zip(both, both[1:]))


def test_generic_jsonl_roundtrip(tmp_path):
    p = tmp_path / "plan.jsonl"
    p.write_text('{"arrival_s": 0.5, "isl": 10, "osl": 3, "class": "x", "priority": "batch"}\n'
                 '\n{"timestamp": 2000, "input_length": 700, "output_length": 2, "hash_ids": [4, 5]}\n')
    reqs = tr.read_trace(str(p))
    assert [(r.arrival_s, r.isl, r.osl, r.cls, r.priority) for r in reqs] == [
        (0.0, 10, 3, "x", "batch"), (1.5, 700, 2, "trace", "interactive")]
    assert reqs[1].hash_ids == [4, 5]


@pytest.mark.parametrize("content,match", [
    ("", "empty"),
    ("a,b,c\n1,2,3\n", "header"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\r\n2023-11-16 18:15:46.68,12,x\r\n", r":2: bad row"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\r\n", "no requests"),
])
def test_bad_csv(tmp_path, content, match):
    p = tmp_path / "t.csv"
    p.write_text(content)
    with pytest.raises(tr.TraceError, match=match):
        tr.read_trace(str(p))


def test_bad_files(tmp_path):
    with pytest.raises(tr.TraceError, match="not found"):
        tr.read_trace(str(tmp_path / "missing.csv"))
    with pytest.raises(tr.TraceError, match="directory"):
        tr.read_trace(str(tmp_path) + "/")
    j = tmp_path / "t.jsonl"
    j.write_text('{"timestamp": 0, "input_length": 5}\n')
    with pytest.raises(tr.TraceError, match=r"t.jsonl:1: bad record"):
        tr.read_trace(str(j))
    b = tmp_path / "t.bin"
    b.write_bytes(b"\xff\xfe\x00\x01" * 100)
    with pytest.raises(tr.TraceError):
        tr.read_trace(str(b))
    with pytest.raises(tr.TraceError, match="time-scale"):
        tr.prepare_trace([], time_scale=0)
