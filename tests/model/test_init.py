"""`tandem model init`: presets, written files, HF compatibility, and ModelConfig's errors on bad dirs."""
from __future__ import annotations

import json
import time

import pytest

from tandem.common.errors import ModelDirError, UnknownPreset
from tandem.engine.model_config import ModelConfig
from tandem.model.presets import PRESETS, get_preset


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tandem.model.init import init_model
    d = tmp_path_factory.mktemp("init") / "tiny"
    t = time.time()
    init_model(d, "tiny", seed=0, device="cpu")
    assert time.time() - t < 10
    return d


def test_unknown_preset(tmp_path):
    from tandem.model.init import init_model
    with pytest.raises(UnknownPreset) as e:
        init_model(tmp_path / "x", "llama-9000")
    for name in PRESETS:
        assert name in str(e.value)
    assert not (tmp_path / "x").exists()
    with pytest.raises(UnknownPreset):
        get_preset("")


def test_tiny_files_and_ids(tiny_dir):
    names = {p.name for p in tiny_dir.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= names
    cfg = json.loads((tiny_dir / "config.json").read_text())
    mc = ModelConfig.from_dir(tiny_dir)
    assert mc.arch == "llama" and mc.num_hidden_layers == 4 and mc.num_key_value_heads == 2
    assert 1e6 < mc.num_params() < 5e6
    from tandem.engine.tokenizer import Tokenizer
    tok = Tokenizer(tiny_dir)
    assert tok.vocab_size <= cfg["vocab_size"]
    assert tok.bos_token_id == cfg["bos_token_id"] < cfg["vocab_size"]
    assert tok.eos_token_ids[0] in cfg["eos_token_id"]
    assert set(cfg["eos_token_id"]) <= set(tok.eos_token_ids)
    gen = json.loads((tiny_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == cfg["eos_token_id"]


def test_hf_accepts_config_and_tokenizer(tiny_dir):
    from transformers import AutoConfig, AutoTokenizer
    hc = AutoConfig.from_pretrained(tiny_dir)
    assert hc.model_type == "llama" and hc.hidden_size == 128
    hf_tok = AutoTokenizer.from_pretrained(tiny_dir)
    assert hf_tok.decode(hf_tok("Hello there").input_ids, skip_special_tokens=True) == "Hello there"


@pytest.mark.parametrize("name", [n for n in PRESETS if n not in ("tiny",)])
def test_hf_accepts_every_preset_config(name):
    from transformers import AutoConfig
    cfg = get_preset(name).hf_config()
    hc = AutoConfig.for_model(**cfg)
    assert hc.num_hidden_layers == cfg["num_hidden_layers"]


def test_seed_determinism(tmp_path):
    from tandem.model.init import init_model
    a = init_model(tmp_path / "a", "tiny-qwen2", seed=7, device="cpu")
    b = init_model(tmp_path / "b", "tiny-qwen2", seed=7, device="cpu")
    c = init_model(tmp_path / "c", "tiny-qwen2", seed=8, device="cpu")
    wa, wb, wc = ((d / "model.safetensors").read_bytes() for d in (a, b, c))
    assert wa == wb != wc
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()


def test_existing_dir_needs_overwrite(tiny_dir, tmp_path):
    from tandem.model.init import init_model, main_model_init
    d = tmp_path / "m"
    assert main_model_init([str(d), "--preset", "tiny-qwen3", "--seed", "3", "--device", "cpu"]) == 0
    assert ModelConfig.from_dir(d).arch == "qwen3"
    with pytest.raises(ModelDirError, match="not empty"):
        init_model(d, "tiny")
    init_model(d, "tiny", dtype="bfloat16", overwrite=True)
    mc = ModelConfig.from_dir(d)
    assert mc.arch == "llama" and mc.torch_dtype == "bfloat16"


def test_dtype_validation(tmp_path):
    from tandem.model.init import init_model
    with pytest.raises(ValueError, match="dtype"):
        init_model(tmp_path / "x", "tiny", dtype="int8")


# ---------------------------------------------------------------------------- real shapes of big presets
REAL = {  # name: (params, hidden, layers, heads, kv heads, head_dim, intermediate, vocab, max_pos, theta, tied)
    "llama-3.2-1b": (1_235_814_400, 2048, 16, 32, 8, 64, 8192, 128256, 131072, 500000.0, True),
    "llama-3.1-8b": (8_030_261_248, 4096, 32, 32, 8, 128, 14336, 128256, 131072, 500000.0, False),
    "llama-3.1-70b": (70_553_706_496, 8192, 80, 64, 8, 128, 28672, 128256, 131072, 500000.0, False),
    "qwen3-8b": (8_190_735_360, 4096, 36, 32, 8, 128, 12288, 151936, 40960, 1000000.0, False),
    "qwen3-32b": (32_762_123_264, 5120, 64, 64, 8, 128, 25600, 151936, 40960, 1000000.0, False),
}


@pytest.mark.parametrize("name", list(REAL))
def test_big_preset_shapes(name):
    mc = ModelConfig.from_dict(get_preset(name).hf_config())
    params, h, layers, heads, kv, hd, inter, vocab, max_pos, theta, tied = REAL[name]
    assert (mc.hidden_size, mc.num_hidden_layers, mc.num_attention_heads, mc.num_key_value_heads, mc.head_dim,
            mc.intermediate_size, mc.vocab_size, mc.max_position_embeddings, mc.rope_theta,
            mc.tie_word_embeddings) == (h, layers, heads, kv, hd, inter, vocab, max_pos, theta, tied)
    assert mc.num_params() == params
    if name.startswith("llama"):
        assert mc.rope_scaling["rope_type"] == "llama3"
        assert mc.rope_scaling["factor"] == (32.0 if name == "llama-3.2-1b" else 8.0)
        assert mc.rope_scaling["original_max_position_embeddings"] == 8192
        assert mc.bos_token_id == 128000 and 128009 in mc.eos_token_ids
    else:
        assert mc.qk_norm and mc.rope_scaling is None and not mc.attention_bias
        assert mc.bos_token_id == 151643 and mc.eos_token_ids == [151645]
    assert mc.kv_bytes_per_token("bfloat16") == 2 * layers * kv * hd * 2


def test_llama_8b_params_approx():
    assert abs(ModelConfig.from_dict(get_preset("llama-3.1-8b").hf_config()).num_params() - 8.03e9) < 0.01e9


@pytest.mark.parametrize("name", ["llama-3.1-8b", "qwen3-8b"])
def test_big_preset_tokenizer_has_real_special_ids(name):
    from tandem.model.presets import QWEN_NOT_SPECIAL
    from tandem.model.tokenizer_build import build_tokenizer
    p = get_preset(name)
    tok = build_tokenizer(p.tokenizer_regular, p.special_tokens, QWEN_NOT_SPECIAL,
                          bos_token=p.bos_token if p.family == "llama" else None)
    if p.family == "llama":
        assert tok.get_vocab_size() == 128256
        assert [tok.token_to_id(t) for t in ("<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>")] == \
            [128000, 128009, 128006]
    else:
        assert tok.get_vocab_size() == 151665
        assert [tok.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [151643, 151644, 151645]
    assert tok.decode(tok.encode("hello world 🎉").ids, skip_special_tokens=True) == "hello world 🎉"


def test_shard_plan_for_8b():
    from tandem.engine.model_config import ModelConfig
    from tandem.model.init import SHARD_BYTES, plan_shards, tensor_specs
    mc = ModelConfig.from_dict(get_preset("llama-3.1-8b").hf_config())
    specs = tensor_specs(mc)
    assert sum(_numel(s) for _, s, _ in specs) == mc.num_params()
    shards = plan_shards(specs, 2)
    assert len(shards) == 4 and sorted(i for s in shards for i in s) == list(range(len(specs)))
    for s in shards:
        assert sum(_numel(specs[i][1]) * 2 for i in s) <= SHARD_BYTES


def _numel(shape):
    n = 1
    for x in shape:
        n *= x
    return n


# ---------------------------------------------------------------------------- malformed model dirs
def _write(d, cfg=None, raw=None, weights=True):
    d.mkdir(parents=True, exist_ok=True)
    if raw is not None:
        (d / "config.json").write_text(raw)
    elif cfg is not None:
        (d / "config.json").write_text(json.dumps(cfg))
    if weights:
        (d / "model.safetensors").write_bytes(b"")
    return d


def test_missing_dir(tmp_path):
    with pytest.raises(ModelDirError, match="does not exist"):
        ModelConfig.from_dir(tmp_path / "nope")


def test_missing_config(tmp_path):
    with pytest.raises(ModelDirError, match="no config.json"):
        ModelConfig.from_dir(_write(tmp_path / "m"))


def test_bad_json(tmp_path):
    with pytest.raises(ModelDirError, match="malformed JSON"):
        ModelConfig.from_dir(_write(tmp_path / "m", raw="{not json"))


def test_unsupported_model_type(tmp_path):
    cfg = dict(get_preset("tiny").hf_config(), model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(ModelDirError, match="unsupported architecture.*gpt2"):
        ModelConfig.from_dir(_write(tmp_path / "m", cfg))


def test_missing_key(tmp_path):
    cfg = get_preset("tiny").hf_config()
    del cfg["hidden_size"]
    with pytest.raises(ModelDirError, match="hidden_size"):
        ModelConfig.from_dir(_write(tmp_path / "m", cfg))


def test_unsupported_rope(tmp_path):
    cfg = dict(get_preset("tiny").hf_config(), rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ModelDirError, match="yarn"):
        ModelConfig.from_dir(_write(tmp_path / "m", cfg))


def test_missing_weights(tmp_path):
    cfg = get_preset("tiny").hf_config()
    with pytest.raises(ModelDirError, match="no \\*.safetensors"):
        ModelConfig.from_dir(_write(tmp_path / "m", cfg, weights=False))
    d = _write(tmp_path / "b", cfg, weights=False)
    (d / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelDirError, match="convert them to safetensors"):
        ModelConfig.from_dir(d)
    d = _write(tmp_path / "s", cfg, weights=False)
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(ModelDirError, match="missing.*00001"):
        ModelConfig.from_dir(d)


def test_transformers5_style_config():
    """rope_parameters (transformers >= 5) and `dtype` are understood like rope_theta/rope_scaling/torch_dtype."""
    cfg = get_preset("llama-3.1-8b").hf_config()
    classic = ModelConfig.from_dict(cfg)
    new = dict(cfg)
    rs, theta = new.pop("rope_scaling"), new.pop("rope_theta")
    new["rope_parameters"] = dict(rs, rope_theta=theta)
    new["dtype"] = new.pop("torch_dtype")
    m = ModelConfig.from_dict(new)
    assert (m.rope_theta, m.rope_scaling, m.torch_dtype) == (classic.rope_theta, classic.rope_scaling, "bfloat16")
    plain = dict(get_preset("tiny-qwen3").hf_config())
    plain["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6}
    del plain["rope_theta"]
    m = ModelConfig.from_dict(plain)
    assert m.rope_theta == 1e6 and m.rope_scaling is None
