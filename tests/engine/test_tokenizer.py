"""Tokenizer: round trips, BOS/EOS handling, parity with HF, chat templates, incremental detokenization."""
from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tandem.common.errors import InvalidParams, ModelDirError
from tandem.engine.tokenizer import IncrementalDetokenizer, Tokenizer

TEXTS = [
    "",
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.\n\n  Two  spaces,\ttabs\tand\r\nnewlines.",
    "naïve café, Straße, 日本語のテキスト, русский, العربية, हिन्दी",
    "emoji: 🎉🚀👩‍👩‍👧‍👦 🇫🇷 ✔︎",
    "def f(x: int) -> int:\n    return {'a': [x ** 2 for _ in range(3)]}  # comment\n",
    "a <|not_a_special|> tag <b>html</b>",
    "\x00\x01 control \u200b zero-width \ufeff bom",
]


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def tok(request, tiny_model_dir):
    return Tokenizer(tiny_model_dir(request.param))


@pytest.fixture(scope="module")
def llama_tok(llama_dir):
    return Tokenizer(llama_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert tok.decode(tok.encode(text)) == text   # BOS is skipped when decoding


def test_special_ids(tok, tiny_model_dir):
    with open(tok_dir(tok, tiny_model_dir) + "/config.json") as f:
        cfg = json.load(f)
    eos_cfg = cfg["eos_token_id"] if isinstance(cfg["eos_token_id"], list) else [cfg["eos_token_id"]]
    assert set(eos_cfg) <= set(tok.eos_token_ids)
    assert tok.eos_token_ids[0] == tok.token_to_id(tok.eos_token)
    assert all(i < cfg["vocab_size"] for i in tok.eos_token_ids)
    assert tok.vocab_size <= cfg["vocab_size"]
    if tok.bos_token:                            # llama: BOS by the post-processor
        assert tok.bos_token_id == cfg["bos_token_id"]
        ids = tok.encode("hi")
        assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id
        assert tok.encode("hi", add_special_tokens=False)[0] != tok.bos_token_id
        assert tok.encode(tok.bos_token + "hi") == ids          # no double BOS from templated text
    else:                                        # qwen: no BOS
        assert tok.bos_token_id is None
        assert tok.encode("hi") == tok.encode("hi", add_special_tokens=False)


def tok_dir(tok, tiny_model_dir):
    return tiny_model_dir("llama" if tok.bos_token else "qwen3")


def test_matches_hf_tokenizer(tok, tiny_model_dir):
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(tok_dir(tok, tiny_model_dir))
    for text in TEXTS:
        assert tok.encode(text) == hf(text).input_ids, text
        ids = tok.encode(text)
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    assert tok.apply_chat_template(msgs) == hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def test_decode_specials_and_padded_vocab(tok):
    eos = tok.eos_token_ids[0]
    ids = tok.encode("a b", add_special_tokens=False)
    assert tok.decode(ids + [eos]) == "a b"
    assert tok.decode(ids + [eos], skip_special_tokens=False) == "a b" + tok.eos_token
    assert tok.encode("a b" + tok.eos_token, add_special_tokens=False) == ids + [eos]   # parsed, as HF does
    # ids past the tokenizer (padded model vocab) decode to nothing instead of failing
    assert tok.decode(ids + [tok.vocab_size, tok.vocab_size + 17]) == "a b"
    # every regular id decodes to visible text (random-weight models sample them all)
    assert all(tok.decode([i]) != "" for i in range(0, tok.vocab_size - 300, 97))


def test_chat_template(tok):
    msgs = [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi."},
            {"role": "user", "content": [{"type": "text", "text": "How "}, {"type": "text", "text": "are you?"}]}]
    s = tok.apply_chat_template(msgs)
    assert "Hello!" in s and "How are you?" in s
    if tok.bos_token:
        assert s.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHello!<|eot_id|>")
        assert s.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    else:
        assert s.startswith("<|im_start|>user\nHello!<|im_end|>\n")
        assert s.endswith("<|im_start|>assistant\n")
    assert not tok.apply_chat_template(msgs, add_generation_prompt=False).endswith("\n\n" if tok.bos_token else
                                                                                  "assistant\n")
    ids = tok.encode(s, add_special_tokens=False)
    assert tok.eos_token_ids[0] in ids          # <|eot_id|> / <|im_end|> are single special tokens
    if tok.bos_token:
        assert ids.count(tok.bos_token_id) == 1 and tok.encode(s).count(tok.bos_token_id) == 1


def test_chat_template_errors(llama_tok):
    with pytest.raises(InvalidParams):
        llama_tok.apply_chat_template([])
    with pytest.raises(InvalidParams):
        llama_tok.apply_chat_template([{"content": "no role"}])
    t = object.__new__(Tokenizer)
    t.__dict__.update(llama_tok.__dict__)
    t.chat_template = None
    with pytest.raises(InvalidParams, match="no chat template"):
        t.apply_chat_template([{"role": "user", "content": "x"}])
    t.chat_template = ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be user') }}"
                       "{% endif %}{{ messages[0]['content'] | tojson }}")
    assert t.apply_chat_template([{"role": "user", "content": "é"}]) == '"é"'
    with pytest.raises(InvalidParams, match="first message must be user"):
        t.apply_chat_template([{"role": "system", "content": "x"}])


def test_missing_tokenizer(tmp_path):
    with pytest.raises(ModelDirError, match="tokenizer.json"):
        Tokenizer(tmp_path)


# ---------------------------------------------------------------------------- incremental detokenization
def stream(tok, prompt_ids, out_ids, chunks, skip=True):
    d = IncrementalDetokenizer(tok, prompt_ids, skip_special_tokens=skip)
    deltas, i = [], 0
    for n in chunks:
        if i >= len(out_ids):
            break
        deltas.append(d.push(out_ids[i:i + n]))
        i += n
    if i < len(out_ids):
        deltas.append(d.push(out_ids[i:]))
    deltas.append(d.flush())
    return deltas


def test_incremental_text_with_multibyte(llama_tok):
    text = " Emoji 🎉 and 日本語 and café — done."
    prompt = llama_tok.encode("Say:")
    out = llama_tok.encode(text, add_special_tokens=False)
    deltas = stream(llama_tok, prompt, out, [1] * len(out))
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)      # partial characters are held back, never emitted
    assert deltas[0] == " Emoji" or deltas[0].startswith(" ")   # left context keeps the leading space


def test_push_int_and_empty(llama_tok):
    d = IncrementalDetokenizer(llama_tok, [])
    assert d.push([]) == ""
    assert d.push(llama_tok.encode("Hi", add_special_tokens=False)[0]) == "Hi"
    assert d.push(llama_tok.eos_token_ids[0]) == ""     # skipped special
    assert d.push(llama_tok.vocab_size + 3) == ""       # padded vocab id
    assert d.flush() == ""


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_incremental_equals_full_decode(llama_tok, data):
    tok = llama_tok
    n = tok.vocab_size
    # bias towards byte tokens (ids < 256: partial UTF-8) and specials, plus ids past the vocab
    tid = st.one_of(st.integers(0, 255), st.integers(0, n + 40), st.sampled_from(tok.eos_token_ids))
    out = data.draw(st.lists(tid, max_size=40), label="out")
    chunks = data.draw(st.lists(st.integers(1, 4), min_size=len(out), max_size=len(out)), label="chunks")
    prompt = tok.encode(data.draw(st.sampled_from(["", "Hello", "naïve 日本"]), label="prompt"))
    skip = data.draw(st.booleans(), label="skip")
    assert "".join(stream(tok, prompt, out, chunks, skip)) == tok.decode(out, skip_special_tokens=skip)


def test_incremental_with_metaspace_decoder(tmp_path):
    """SentencePiece-style tokenizers (Mistral, Llama 2) drop the leading '▁' space at a decode window's
    start; deltas must still carry their spaces."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from tandem.model.tokenizer_build import CORPUS
    raw = RawTokenizer(models.BPE(byte_fallback=True, unk_token=None))
    raw.pre_tokenizer = pre_tokenizers.Metaspace()
    raw.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=600, show_progress=False,
                                  special_tokens=["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)])
    raw.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    raw.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    tok = Tokenizer(tmp_path)
    prompt = tok.encode("Tell me:", add_special_tokens=False)
    for text in ["The quick brown fox jumps over the lazy dog.", "café 日本語 🎉 ok"]:
        out = tok.encode(text, add_special_tokens=False)
        expect = tok.decode(prompt + out)[len(tok.decode(prompt)):]
        assert "".join(stream(tok, prompt, out, [1] * len(out))) == expect
