"""`tandem model init DIR --preset P`: write a random-weight model in Hugging Face format.

Writes config.json, generation_config.json, model.safetensors (or ~5 GB shards + index),
tokenizer.json and tokenizer_config.json (with a chat template). Weights are generated one tensor at a
time on `device` (CUDA when available) in the target dtype, then written shard by shard, so host memory
holds at most one shard. The result loads in HF transformers and in Tandem alike.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tandem.common.errors import ModelDirError
from tandem.engine.model_config import ModelConfig
from tandem.model.presets import PRESETS, QWEN_NOT_SPECIAL, Preset, get_preset

SHARD_BYTES = 5 * 10**9
_DTYPE_NAMES = ("float32", "float16", "bfloat16")
TRANSFORMERS_VERSION = "4.46.0"   # recorded in config.json, as HF checkpoints do


def tensor_specs(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...], str]]:
    """(HF name, shape, kind) of every checkpoint tensor, in checkpoint order. kind: weight | bias | norm."""
    h, hd = cfg.hidden_size, cfg.head_dim
    out = [("model.embed_tokens.weight", (cfg.vocab_size, h), "weight")]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        out.append((p + "input_layernorm.weight", (h,), "norm"))
        for n, rows in (("q_proj", cfg.q_size), ("k_proj", cfg.kv_size), ("v_proj", cfg.kv_size)):
            out.append((p + f"self_attn.{n}.weight", (rows, h), "weight"))
            if cfg.attention_bias:
                out.append((p + f"self_attn.{n}.bias", (rows,), "bias"))
        out.append((p + "self_attn.o_proj.weight", (h, cfg.q_size), "weight"))
        if cfg.o_proj_bias:
            out.append((p + "self_attn.o_proj.bias", (h,), "bias"))
        if cfg.qk_norm:
            out.append((p + "self_attn.q_norm.weight", (hd,), "norm"))
            out.append((p + "self_attn.k_norm.weight", (hd,), "norm"))
        out.append((p + "post_attention_layernorm.weight", (h,), "norm"))
        out.append((p + "mlp.gate_proj.weight", (cfg.intermediate_size, h), "weight"))
        out.append((p + "mlp.up_proj.weight", (cfg.intermediate_size, h), "weight"))
        out.append((p + "mlp.down_proj.weight", (h, cfg.intermediate_size), "weight"))
    out.append(("model.norm.weight", (h,), "norm"))
    if not cfg.tie_word_embeddings:
        out.append(("lm_head.weight", (cfg.vocab_size, h), "weight"))
    return out


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def plan_shards(specs, itemsize: int, shard_bytes: int = SHARD_BYTES) -> list[list[int]]:
    """Group tensor indices into shards of at most ~shard_bytes (a bigger single tensor gets its own)."""
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, shape, _) in enumerate(specs):
        b = _numel(shape) * itemsize
        if shards[-1] and size + b > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += b
    return shards


def write_tokenizer(out: Path, preset: Preset, max_len: int) -> None:
    from tandem.model.tokenizer_build import build_tokenizer
    tok = build_tokenizer(preset.tokenizer_regular, preset.special_tokens, QWEN_NOT_SPECIAL,
                          bos_token=preset.bos_token if preset.family == "llama" else None)
    tok.save(str(out / "tokenizer.json"))
    tc = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": preset.bos_token if preset.family == "llama" else None,
        "eos_token": preset.eos_token,
        "pad_token": None if preset.family == "llama" else "<|endoftext|>",
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
        "model_input_names": ["input_ids", "attention_mask"],
        "chat_template": preset.chat_template,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n")


def init_model(out_dir: str | Path, preset: str = "tiny", dtype: str = "auto", seed: int = 0,
               device: str | None = None, *, overrides: dict | None = None, init_std: float | None = None,
               norm_std: float = 0.0, overwrite: bool = False, verbose: bool = False) -> Path:
    """Write a random-weight model of `preset` into `out_dir`; returns the directory.

    dtype: "auto" (the preset's: float32 for tiny, bfloat16 otherwise) | float32 | float16 | bfloat16.
    device: where weights are generated (default: cuda if available, else cpu). Same seed + device type
    -> same weights. overrides: config.json keys to change (tests: tie_word_embeddings, rope_scaling...).
    init_std: std of linear/embedding weights and biases (default hidden_size**-0.5: 0.016 for 8B, 0.088 for
    tiny, so attention is not flat); norm_std: norm weights are 1 + norm_std * N(0, 1) (default: all 1).
    An existing non-empty directory is refused unless overwrite=True.
    """
    import torch
    from safetensors.torch import save_file

    p = get_preset(preset)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ModelDirError(f"{str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ModelDirError(f"{str(out)!r} is not empty (pass overwrite=True / --overwrite to replace it)")
        for f in list(out.glob("*.safetensors")) + list(out.glob("model.safetensors.index.json")):
            f.unlink()
    out.mkdir(parents=True, exist_ok=True)

    hf = p.hf_config(overrides)
    if dtype == "auto":
        dtype = hf.get("torch_dtype", "bfloat16")
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"dtype must be 'auto' or one of {_DTYPE_NAMES}, got {dtype!r}")
    hf["torch_dtype"] = dtype
    hf["transformers_version"] = TRANSFORMERS_VERSION
    cfg = ModelConfig.from_dict(hf, where=f"preset {preset!r}")
    tdtype = getattr(torch, dtype)
    if init_std is None:
        init_std = cfg.hidden_size ** -0.5
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    t0 = time.time()

    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    gen = {"bos_token_id": hf["bos_token_id"], "eos_token_id": p.eos_token_ids,
           "transformers_version": TRANSFORMERS_VERSION}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    write_tokenizer(out, p, cfg.max_position_embeddings)

    specs = tensor_specs(cfg)
    itemsize = torch.empty((), dtype=tdtype).element_size()
    shards = plan_shards(specs, itemsize, SHARD_BYTES)
    g = torch.Generator(device=dev)
    g.manual_seed(seed)
    weight_map: dict[str, str] = {}
    total = 0
    for si, idxs in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{si + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for i in idxs:
            name, shape, kind = specs[i]
            t = torch.empty(shape, dtype=tdtype, device=dev)
            if kind == "norm":
                if norm_std:
                    t.normal_(1.0, norm_std, generator=g)
                else:
                    t.fill_(1.0)
            else:
                t.normal_(0.0, init_std, generator=g)
            tensors[name] = t.cpu()
            weight_map[name] = fname
            total += t.numel() * itemsize
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        (out / fname).chmod(0o644)        # safetensors writes 0600; servers may run as another user
        del tensors
        if verbose:
            print(f"  wrote {fname} ({si + 1}/{len(shards)})", file=sys.stderr)
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    if verbose:
        print(f"initialized {preset} ({cfg.num_params() / 1e9:.3f}B params, {total / 1e9:.2f} GB {dtype}) "
              f"in {out} in {time.time() - t0:.1f}s on {dev}", file=sys.stderr)
    return out


# ---------------------------------------------------------------------------- CLI glue
def add_model_init_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("dir", help="output directory (created)")
    parser.add_argument("--preset", default="tiny", help=f"one of: {', '.join(PRESETS)} (default tiny)")
    parser.add_argument("--dtype", default="auto", help="auto | float32 | float16 | bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="where to generate weights (default: cuda if available)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty directory")
    return parser


def run_model_init(args: argparse.Namespace) -> int:
    init_model(args.dir, args.preset, dtype=args.dtype, seed=args.seed, device=args.device,
               overwrite=args.overwrite, verbose=True)
    print(str(Path(args.dir)))
    return 0


def main_model_init(argv: list[str] | None = None) -> int:
    """`tandem model init DIR --preset P [--dtype D] [--seed S] [--device X] [--overwrite]`; returns exit code.
    TandemError (UnknownPreset, ModelDirError) propagates for the CLI to print."""
    parser = add_model_init_arguments(argparse.ArgumentParser(prog="tandem model init",
                                                              description="write a random-weight model"))
    return run_model_init(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main_model_init())
