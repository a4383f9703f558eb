"""`ModelConfig`: the architecture facts Tandem needs, parsed from a Hugging Face `config.json`.

Accepts both the classic layout (`rope_theta` + `rope_scaling`, `torch_dtype`) and the
transformers>=5 one (`rope_parameters`, `dtype`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tandem.common.errors import ModelDirError

# model_type -> arch; architectures[0] -> arch
_MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"}
_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                  "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")
_DTYPES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1}


@dataclass
class ModelConfig:
    arch: str                                   # llama | mistral | qwen2 | qwen3
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None            # None = plain RoPE; else {"rope_type": "llama3"|"linear", ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False                # bias on q/k/v projections (always on for qwen2)
    o_proj_bias: bool = False                   # bias on o_proj (llama/qwen3 `attention_bias`; never qwen2)
    qk_norm: bool = False                       # per-head RMSNorm on q and k before RoPE (qwen3)
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    torch_dtype: str = "bfloat16"               # storage dtype recorded in config.json
    sliding_window: int | None = None           # recorded only; Tandem attends to the full context
    raw: dict = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ parsing
    @classmethod
    def from_dict(cls, cfg: dict[str, Any], where: str = "config.json") -> "ModelConfig":
        if not isinstance(cfg, dict):
            raise ModelDirError(f"{where}: expected a JSON object, got {type(cfg).__name__}")
        arch = _MODEL_TYPES.get(cfg.get("model_type", ""))
        if arch is None:
            for a in cfg.get("architectures") or []:
                arch = _ARCHITECTURES.get(a)
                if arch:
                    break
        if arch is None:
            raise ModelDirError(
                f"{where}: unsupported architecture (model_type={cfg.get('model_type')!r}, "
                f"architectures={cfg.get('architectures')!r}); supported model_type: {sorted(_MODEL_TYPES)}")
        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            kwargs = dict(
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_hidden_layers=int(cfg["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
            )
        except KeyError as e:
            raise ModelDirError(f"{where}: missing required key {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ModelDirError(f"{where}: bad value ({e})") from None
        if cfg.get("mlp_bias"):
            raise ModelDirError(f"{where}: mlp_bias=true is not supported")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ModelDirError(f"{where}: hidden_act={cfg.get('hidden_act')!r} is not supported (only silu)")

        # RoPE: classic `rope_theta` + `rope_scaling`, or transformers-5 `rope_parameters`
        rp = cfg.get("rope_parameters") or {}
        rs = cfg.get("rope_scaling") or (rp if rp.get("rope_type", rp.get("type", "default")) != "default" else None)
        theta = float(cfg.get("rope_theta") or rp.get("rope_theta") or 10000.0)
        rope_scaling = None
        if rs:
            rope_scaling = dict(rs)
            rtype = rope_scaling.pop("type", None)
            rope_scaling.setdefault("rope_type", rtype or "default")
            rope_scaling.pop("rope_theta", None)
            if rope_scaling["rope_type"] not in SUPPORTED_ROPE_TYPES:
                raise ModelDirError(f"{where}: rope_scaling type {rope_scaling['rope_type']!r} is not supported "
                                    f"(supported: {SUPPORTED_ROPE_TYPES})")
            if rope_scaling["rope_type"] == "default":
                rope_scaling = None
            elif rope_scaling["rope_type"] == "llama3":
                rope_scaling.setdefault("original_max_position_embeddings",
                                        int(cfg.get("max_position_embeddings", 8192)))
                missing = {"factor", "low_freq_factor", "high_freq_factor"} - set(rope_scaling)
                if missing:
                    raise ModelDirError(f"{where}: llama3 rope_scaling lacks {sorted(missing)}")

        eos = cfg.get("eos_token_id")
        eos_ids = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])
        bias = bool(cfg.get("attention_bias", False))
        sw = cfg.get("sliding_window") if cfg.get("use_sliding_window", arch == "mistral") else None
        return cls(
            arch=arch, **kwargs,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=True if arch == "qwen2" else bias,
            o_proj_bias=False if arch == "qwen2" else bias,
            qk_norm=arch == "qwen3",
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16").replace("torch.", ""),
            sliding_window=sw,
            raw=cfg,
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelConfig":
        """Parse `path/config.json` and check the directory has safetensors weights."""
        d = Path(path)
        if not d.exists():
            raise ModelDirError(f"model directory {str(d)!r} does not exist")
        if not d.is_dir():
            raise ModelDirError(f"model path {str(d)!r} is not a directory")
        cfg_file = d / "config.json"
        if not cfg_file.is_file():
            raise ModelDirError(f"{str(d)!r} has no config.json (not a Hugging Face model directory?)")
        try:
            cfg = json.loads(cfg_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelDirError(f"{cfg_file}: malformed JSON ({e})") from None
        mc = cls.from_dict(cfg, where=str(cfg_file))
        weight_files(d)  # raises when none
        return mc

    # ------------------------------------------------------------------ sizes
    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def num_params(self) -> int:
        """Parameter count from the shapes alone (lm_head counted once when tied)."""
        h, i = self.hidden_size, self.intermediate_size
        attn = h * (self.q_size + 2 * self.kv_size) + self.q_size * h
        if self.attention_bias:
            attn += self.q_size + 2 * self.kv_size
        if self.o_proj_bias:
            attn += h
        if self.qk_norm:
            attn += 2 * self.head_dim
        layer = attn + 3 * h * i + 2 * h
        emb = self.vocab_size * h
        return emb * (1 if self.tie_word_embeddings else 2) + self.num_hidden_layers * layer + h

    def kv_bytes_per_token(self, dtype: Any = "bfloat16") -> int:
        """Bytes of K+V cache one token takes over all layers."""
        return 2 * self.num_hidden_layers * self.kv_size * _itemsize(dtype)

    def weight_bytes(self, dtype: Any = "bfloat16") -> int:
        return self.num_params() * _itemsize(dtype)


def _itemsize(dtype: Any) -> int:
    if isinstance(dtype, str):
        name = dtype.replace("torch.", "")
        if name not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}")
        return _DTYPES[name]
    return int(getattr(dtype, "itemsize"))      # torch.dtype


def weight_files(d: str | Path) -> list[Path]:
    """The directory's safetensors files (sharded through the index when there is one)."""
    d = Path(d)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            wm = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ModelDirError(f"{index}: malformed index ({e!r})") from None
        files = sorted({d / f for f in wm.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelDirError(f"{str(d)!r}: weight shards listed in the index are missing: {missing}")
        return files
    files = sorted(d.glob("*.safetensors"))
    if not files:
        if list(d.glob("*.bin")) or list(d.glob("*.pt")):
            raise ModelDirError(f"{str(d)!r} has only PyTorch .bin/.pt weights; convert them to safetensors")
        raise ModelDirError(f"{str(d)!r} has no *.safetensors weights")
    return files
