"""Model presets for `tandem model init`: tiny CPU-test models and the real shapes of popular models.

Each preset is the Hugging Face `config.json` it writes (minus bos/eos ids, which come from the
tokenizer family) plus the tokenizer family. The big presets carry the real architecture values of
the published models; their weights are random. Torch-free.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from tandem.common.errors import UnknownPreset

# Llama 3 reserves the top 256 ids for special tokens; Qwen2/3 put 22 after 151643 regular tokens and
# pad the embedding to 151936.
LLAMA3_SPECIAL = (["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
                  + [f"<|reserved_special_token_{i}|>" for i in range(3, 248)])
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
                "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
                "<|repo_name|>", "<|file_sep|>"]
QWEN_NOT_SPECIAL = {"<tool_call>", "</tool_call>"}   # added tokens, but not skipped when decoding

LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")


@dataclass(frozen=True)
class Preset:
    name: str
    family: str                 # "llama" | "qwen": tokenizer specials + chat template
    config: dict                # config.json without bos/eos ids
    tokenizer_regular: int      # number of regular (non-special) tokenizer ids; specials start here
    description: str = ""
    tags: tuple = field(default=())

    @property
    def special_tokens(self) -> list[str]:
        return LLAMA3_SPECIAL if self.family == "llama" else QWEN_SPECIAL

    @property
    def tokenizer_size(self) -> int:
        return self.tokenizer_regular + len(self.special_tokens)

    def special_id(self, token: str) -> int:
        return self.tokenizer_regular + self.special_tokens.index(token)

    @property
    def bos_token(self) -> str:
        return "<|begin_of_text|>" if self.family == "llama" else "<|endoftext|>"

    @property
    def eos_token(self) -> str:
        return "<|eot_id|>" if self.family == "llama" else "<|im_end|>"

    @property
    def eos_token_ids(self) -> list[int]:
        """All ids that end generation (config.json / generation_config.json `eos_token_id`)."""
        if self.family == "llama":
            return [self.special_id(t) for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")]
        return [self.special_id("<|im_end|>"), self.special_id("<|endoftext|>")]

    @property
    def chat_template(self) -> str:
        return LLAMA3_CHAT_TEMPLATE if self.family == "llama" else CHATML_TEMPLATE

    def hf_config(self, overrides: dict | None = None) -> dict:
        """The full config.json content."""
        cfg = dict(self.config)
        cfg["bos_token_id"] = self.special_id(self.bos_token)
        cfg["eos_token_id"] = self.eos_token_ids if self.family == "llama" else self.special_id(self.eos_token)
        if overrides:
            cfg.update(overrides)
        if cfg["vocab_size"] < self.tokenizer_size:
            raise ValueError(f"vocab_size {cfg['vocab_size']} < tokenizer size {self.tokenizer_size}")
        return cfg


def _llama(hidden, inter, layers, heads, kv, vocab=128256, max_pos=131072, theta=500000.0, tie=False,
           rope_scaling=None, dtype="bfloat16", eps=1e-5, head_dim=None) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": head_dim or hidden // heads,
        "hidden_act": "silu", "max_position_embeddings": max_pos, "rms_norm_eps": eps,
        "rope_theta": theta, "rope_scaling": rope_scaling, "vocab_size": vocab,
        "tie_word_embeddings": tie, "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
        "initializer_range": 0.02, "pretraining_tp": 1, "use_cache": True, "torch_dtype": dtype,
    }


def _qwen(arch, hidden, inter, layers, heads, kv, vocab=151936, max_pos=40960, theta=1000000.0, tie=False,
          dtype="bfloat16", eps=1e-6, head_dim=None) -> dict:
    cfg = {
        "architectures": ["Qwen3ForCausalLM" if arch == "qwen3" else "Qwen2ForCausalLM"], "model_type": arch,
        "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv,
        "hidden_act": "silu", "max_position_embeddings": max_pos, "rms_norm_eps": eps,
        "rope_theta": theta, "rope_scaling": None, "vocab_size": vocab, "tie_word_embeddings": tie,
        "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True, "torch_dtype": dtype,
        "use_sliding_window": False, "sliding_window": None, "max_window_layers": layers,
    }
    if arch == "qwen3":
        cfg["head_dim"] = head_dim or hidden // heads
        cfg["attention_bias"] = False
    return cfg


LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
LLAMA32_ROPE = {**LLAMA31_ROPE, "factor": 32.0}

_TINY = dict(hidden=128, inter=384, layers=4, heads=4, kv=2, vocab=4096, max_pos=2048, dtype="float32")

PRESETS: dict[str, Preset] = {p.name: p for p in [
    Preset("tiny", "llama", _llama(**_TINY, theta=10000.0), 4096 - 256,
           "Llama-3-style, 4 layers, hidden 128 (~1.8M params), for CPU tests", ("tiny",)),
    Preset("tiny-qwen2", "qwen", _qwen("qwen2", **_TINY, tie=True), 4000,
           "Qwen2.5-style (qkv bias, tied embeddings), ~1.3M params", ("tiny",)),
    Preset("tiny-qwen3", "qwen", _qwen("qwen3", **_TINY, head_dim=48), 4000,
           "Qwen3-style (q/k norm, head_dim 48 != hidden/heads), ~1.9M params", ("tiny",)),
    Preset("llama-3.2-1b", "llama", _llama(2048, 8192, 16, 32, 8, tie=True, rope_scaling=LLAMA32_ROPE), 128000,
           "Llama-3.2-1B shapes (1.24B params)"),
    Preset("llama-3.1-8b", "llama", _llama(4096, 14336, 32, 32, 8, rope_scaling=LLAMA31_ROPE), 128000,
           "Llama-3.1-8B shapes (8.03B params)"),
    Preset("llama-3.1-70b", "llama", _llama(8192, 28672, 80, 64, 8, rope_scaling=LLAMA31_ROPE), 128000,
           "Llama-3.1-70B shapes (70.6B params)"),
    Preset("qwen3-8b", "qwen", _qwen("qwen3", 4096, 12288, 36, 32, 8, head_dim=128), 151643,
           "Qwen3-8B shapes (8.19B params)"),
    Preset("qwen3-32b", "qwen", _qwen("qwen3", 5120, 25600, 64, 64, 8, head_dim=128), 151643,
           "Qwen3-32B shapes (32.8B params)"),
]}


def get_preset(name: str) -> Preset:
    p = PRESETS.get(name)
    if p is None:
        raise UnknownPreset(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return p
