"""Load a Hugging Face-format directory into a `CausalLM`.

Parameters are allocated uninitialised directly on the target device and dtype (no random init),
then each checkpoint tensor is read by `safetensors` straight onto the device, cast, and copied into
its parameter (or its row slice of a fused `qkv_proj` / `gate_up_proj`).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from tandem.common.errors import ModelDirError
from tandem.engine.model import CausalLM
from tandem.engine.model_config import ModelConfig, weight_files

# checkpoint tensors that carry nothing we need
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

_DTYPE_NAMES = {"float32": torch.float32, "float": torch.float32, "float16": torch.float16,
                "half": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype: torch.dtype | str | None, cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """A torch dtype from a dtype, a name, or `auto`/None (config.json's torch_dtype)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return _DTYPE_NAMES.get(cfg.torch_dtype, torch.bfloat16)
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPE_NAMES)} or 'auto'")
    return _DTYPE_NAMES[dtype]


def _st_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{device.index if device.index is not None else torch.cuda.current_device()}"
    return str(device)


def _shard_slices(cfg: ModelConfig) -> dict[str, list[tuple[int, int]]]:
    q, kv, i = cfg.q_size, cfg.kv_size, cfg.intermediate_size
    return {"qkv_proj": [(0, q), (q, q + kv), (q + kv, q + 2 * kv)], "gate_up_proj": [(0, i), (i, 2 * i)]}


def load_model(model_dir: str | Path, dtype: torch.dtype | str | None = None,
               device: torch.device | str = "cpu") -> tuple[CausalLM, ModelConfig]:
    """Build and fill the model. dtype: torch dtype, a name, or None/'auto' (config.json's torch_dtype)."""
    model_dir = Path(model_dir)
    cfg = ModelConfig.from_dir(model_dir)
    device = torch.device(device)
    dtype = resolve_dtype(dtype, cfg, device)
    model = CausalLM(cfg, dtype=dtype, device=device)
    params = dict(model.named_parameters(remove_duplicate=False))
    slices = _shard_slices(cfg)
    # every (param, shard) that must be filled; fused params have one entry per shard
    todo: set[tuple[str, int]] = set()
    for name in params:
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        leaf = name.split(".")[-2]
        todo.update((name, s) for s in range(len(slices.get(leaf, [None]))))

    unexpected: list[str] = []
    with torch.no_grad():
        for path in weight_files(model_dir):
            try:
                f = safe_open(str(path), framework="pt", device=_st_device(device))
            except Exception as e:  # safetensors raises its own error types
                raise ModelDirError(f"{path}: cannot read safetensors file ({e})") from None
            with f:
                for ck_name in f.keys():
                    if ck_name.endswith(_IGNORED_SUFFIXES):
                        continue
                    if ck_name == "lm_head.weight" and cfg.tie_word_embeddings:
                        continue                      # some tied checkpoints store it anyway
                    target, shard = _map_name(ck_name)
                    if target not in params:
                        unexpected.append(ck_name)
                        continue
                    t = f.get_tensor(ck_name)
                    p = params[target]
                    dst = p.data
                    if shard is not None:
                        lo, hi = slices[target.split(".")[-2]][shard]
                        dst = dst[lo:hi]
                    if tuple(t.shape) != tuple(dst.shape):
                        raise ModelDirError(f"{path.name}: tensor {ck_name!r} has shape {tuple(t.shape)}, "
                                            f"config.json implies {tuple(dst.shape)}")
                    dst.copy_(t)
                    todo.discard((target, shard or 0))
    if unexpected:
        raise ModelDirError(f"{str(model_dir)!r}: checkpoint has tensors this architecture does not use "
                            f"(unsupported variant?): {sorted(unexpected)[:8]}")
    if todo:
        missing = sorted(_hf_name(n, s) for n, s in todo)
        raise ModelDirError(f"{str(model_dir)!r}: checkpoint is missing {len(missing)} tensors, e.g. {missing[:8]}")
    model.eval()
    return model, cfg


def _map_name(ck_name: str) -> tuple[str, int | None]:
    """HF checkpoint name -> (our param name, shard index within a fused param or None)."""
    parts = ck_name.split(".")
    if len(parts) >= 2 and parts[-2] in CausalLM.packed_modules:
        fused, shard = CausalLM.packed_modules[parts[-2]]
        return ".".join(parts[:-2] + [fused, parts[-1]]), shard
    return ck_name, None


def _hf_name(name: str, shard: int) -> str:
    parts = name.split(".")
    for hf, (fused, s) in CausalLM.packed_modules.items():
        if parts[-2] == fused and s == shard:
            return ".".join(parts[:-2] + [hf, parts[-1]])
    return name


def checkpoint_tensor_names(model_dir: str | Path) -> list[str]:
    """All tensor names of a checkpoint (for diagnostics)."""
    d = Path(model_dir)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        return sorted(json.loads(index.read_text())["weight_map"])
    names: list[str] = []
    for p in weight_files(d):
        with safe_open(str(p), framework="pt") as f:
            names.extend(f.keys())
    return sorted(names)
