"""Exact-length prompts and real shared prefixes."""
import json
import random

import pytest

from tandem.bench import traces as tr
from tandem.bench.prompts import PromptBuilder, PromptError, _COMMON_WORDS, load_tokenizer
from tandem.bench.traces import BenchRequest


def req(isl, hash_ids=(), idx=0, ns=0, bs=512):
    return BenchRequest(arrival_s=0, cls="c", priority="interactive", isl=isl, osl=4,
                        hash_ids=list(hash_ids), block_size=bs, namespace=ns, idx=idx)


@pytest.mark.parametrize("isl", [1, 7, 511, 512, 513, 3000])
def test_ids_exact_length_and_range(isl):
    pb = PromptBuilder("ids")
    ids = pb.token_ids(req(isl, idx=3))
    assert len(ids) == isl
    assert all(10 <= i < 250 for i in ids)
    assert json.loads(pb.prompt_json(req(isl, idx=3))) == ids


def test_ids_custom_range_and_determinism():
    a = PromptBuilder("ids", token_range=(1000, 1010), seed=5).token_ids(req(100, idx=1))
    b = PromptBuilder("ids", token_range=(1000, 1010), seed=5).token_ids(req(100, idx=1))
    c = PromptBuilder("ids", token_range=(1000, 1010), seed=6).token_ids(req(100, idx=1))
    assert a == b != c
    assert set(a) <= set(range(1000, 1010))
    with pytest.raises(PromptError):
        PromptBuilder("ids", token_range=(5, 5))


def test_unique_requests_do_not_share_prefixes():
    pb = PromptBuilder("ids")
    a, b = pb.token_ids(req(64, idx=1)), pb.token_ids(req(64, idx=2))
    assert a[:16] != b[:16]


def test_mooncake_prefix_sharing_on_real_rows(traces_dir):
    raw = tr.read_trace(str(traces_dir / "mooncake_fast25_conversation_0-30min.jsonl"))[:200]
    reqs = tr.finalize(raw)
    pb = PromptBuilder("ids")
    # rows 0 and 1 share block 0 only: [0, 1, ...] vs [0, 14, ...]
    r0, r1 = reqs[0], reqs[1]
    assert r0.hash_ids[0] == r1.hash_ids[0] and r0.hash_ids[1] != r1.hash_ids[1]
    p0, p1 = pb.token_ids(r0), pb.token_ids(r1)
    assert len(p0) == r0.isl and len(p1) == r1.isl
    assert p0[:512] == p1[:512]
    assert p0[512:1024] != p1[512:1024]
    # every pair: the common token prefix is exactly (common leading hash ids) * 512, capped at isl
    rng = random.Random(0)
    for _ in range(60):
        a, b = rng.sample(reqs, 2)
        k = 0
        while k < min(len(a.hash_ids), len(b.hash_ids)) and a.hash_ids[k] == b.hash_ids[k]:
            k += 1
        pa, pb_ = pb.token_ids(a), pb.token_ids(b)
        n = min(k * 512, a.isl, b.isl)
        assert pa[:n] == pb_[:n]
        if n < min(a.isl, b.isl):
            assert pa[n:n + 512] != pb_[n:n + 512]


def test_partial_last_block_is_a_prefix_of_the_full_block():
    pb = PromptBuilder("ids")
    short, long_ = pb.token_ids(req(100, [5], idx=1)), pb.token_ids(req(900, [5, 6], idx=2))
    assert short == long_[:100]
    # other namespaces (another trace) do not collide
    assert pb.token_ids(req(100, [5], idx=1, ns=1)) != short


def test_workload_shared_system_prompt():
    from tandem.bench import workloads as wl
    p = wl.WorkloadParams(chat_prefix=64, rate=50)
    rs = tr.finalize(wl.generate("chat", p, max_requests=5, seed=1))
    pb = PromptBuilder("ids")
    ps = [pb.token_ids(r) for r in rs]
    assert all(len(x) == r.isl for x, r in zip(ps, rs))
    assert all(x[:64] == ps[0][:64] for x in ps)
    assert len({tuple(x[64:80]) for x in ps}) == 5


def test_text_without_tokenizer_word_count():
    pb = PromptBuilder("text")
    t = pb.text(req(300, idx=4))
    words = t.split()
    assert len(words) == 300
    assert set(words) <= set(_COMMON_WORDS)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A small byte-level BPE tokenizer with a BOS post-processor, trained here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    rng = random.Random(0)
    words = list(dict.fromkeys(_COMMON_WORDS))
    corpus = [" ".join(rng.choice(words) for _ in range(50)) + ", and 42 more." for _ in range(400)]
    tok.train_from_iterator(corpus, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    d = tmp_path_factory.mktemp("tok")
    tok.save(str(d / "tokenizer.json"))
    return d


@pytest.mark.parametrize("isl", [2, 5, 100, 513, 2000])
def test_text_with_tokenizer_is_exact(tokenizer_dir, isl):
    tok = load_tokenizer(str(tokenizer_dir))
    pb = PromptBuilder("text", tokenizer=tok)
    assert pb.n_special == 1
    t = pb.text(req(isl, idx=isl))
    assert len(tok.encode(t, add_special_tokens=True).ids) == isl


def test_text_with_tokenizer_shares_prefixes(tokenizer_dir):
    tok = load_tokenizer(str(tokenizer_dir))
    pb = PromptBuilder("text", tokenizer=tok)
    a = tok.encode(pb.text(req(1500, [7, 8, 9], idx=1))).ids
    b = tok.encode(pb.text(req(1400, [7, 8, 3], idx=2))).ids
    assert len(a) == 1500 and len(b) == 1400
    assert a[:1 + 1024 - 1] == b[:1 + 1024 - 1]      # BOS + two shared blocks (the last word may merge)
    assert a[1100:1200] != b[1100:1200]


def test_ids_from_tokenizer_vocab_skip_specials(tokenizer_dir):
    tok = load_tokenizer(str(tokenizer_dir))
    pb = PromptBuilder("ids", tokenizer=tok)
    ids = pb.token_ids(req(2000, idx=1))
    specials = {tok.token_to_id("<s>"), tok.token_to_id("</s>")}
    assert not specials & set(ids)
    assert max(ids) < tok.get_vocab_size()


def test_bad_tokenizer(tmp_path):
    with pytest.raises(PromptError, match="no tokenizer.json"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(PromptError, match="cannot load"):
        load_tokenizer(str(tmp_path))
