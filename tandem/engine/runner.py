"""ModelRunner: owns the model, the KV tensor and the device; turns a ScheduledBatch into one forward."""
from __future__ import annotations

import logging
import os

import torch

from tandem.engine import gemv
from tandem.engine.attention import AttnMetadata
from tandem.engine.config import EngineConfig
from tandem.engine.hostcopy import HostIds, to_device
from tandem.engine.loader import load_model
from tandem.engine.tokenizer import IncrementalDetokenizer, Tokenizer

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def _extend_slots(slots: list[int], table: list[int], start: int, end: int, bs: int) -> None:
    """Append the KV slot of every position in [start, end): one C-level range per block, not a Python
    step per token (a 2,048-token chunk took ~0.25 ms of host time token by token)."""
    p = start
    while p < end:
        b, off = divmod(p, bs)
        q = min(end, (b + 1) * bs)
        base = table[b] * bs + off
        slots.extend(range(base, base + q - p))
        p = q


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose from {sorted(_DTYPES)}")
    return _DTYPES[name]


class ModelRunner:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        torch.manual_seed(config.seed)
        if self.device.type == "cpu":
            torch.set_num_threads(config.cpu_threads or int(os.environ.get("TANDEM_CPU_THREADS", "1")))
        self.tokenizer = Tokenizer(config.model)
        self.model, self.model_config = load_model(config.model, self.dtype, self.device)
        mc = self.model_config
        self.max_model_len = config.max_model_len or mc.max_position_embeddings
        self.block_size = config.block_size
        self.num_kv_blocks = config.num_kv_blocks or self._auto_num_blocks()
        from tandem.engine import triton_attention
        use_graphs = self.device.type == "cuda" and config.cuda_graphs and triton_attention.available()
        # with CUDA graphs, one extra block (never handed out by the pool) takes the padding rows' KV
        self.kv_cache = torch.zeros(mc.num_hidden_layers, 2, self.num_kv_blocks + use_graphs, self.block_size,
                                    mc.num_key_value_heads, mc.head_dim, dtype=self.dtype, device=self.device)
        log.info("KV cache: %d blocks x %d tokens (%.2f GiB)", self.num_kv_blocks, self.block_size,
                 self.kv_cache.numel() * self.kv_cache.element_size() / 2**30)
        self.graphs = None
        self.gemv_choices = []
        if use_graphs and gemv.enabled():        # one-row GEMVs, before capture: the graphs bake the choice in
            self.gemv_choices = gemv.tune(self.model)
        if use_graphs:
            from tandem.engine.cuda_graph import DecodeGraphRunner
            self.graphs = DecodeGraphRunner(self.model, self.kv_cache, self.block_size, self.max_model_len,
                                            min(config.max_num_seqs, 512), scratch_block=self.num_kv_blocks)
            self.graphs.capture()
        self.host_ids = HostIds(self.device, config.max_num_seqs)

    def _bytes_per_block(self) -> int:
        mc = self.model_config
        return mc.num_hidden_layers * 2 * self.block_size * mc.num_key_value_heads * mc.head_dim * \
            torch.tensor([], dtype=self.dtype).element_size()

    def _auto_num_blocks(self) -> int:
        if self.config.kv_cache_memory_gb is not None:
            budget = self.config.kv_cache_memory_gb * 2**30
        elif self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            reserve = total * (1 - self.config.gpu_memory_utilization) + 2 * 2**30   # activations, graphs
            budget = max(free - reserve, 0)
        else:
            budget = 0.25 * 2**30
        n = int(budget // self._bytes_per_block())
        # no point holding more than max_num_seqs full contexts
        cap = self.config.max_num_seqs * ((self.max_model_len + self.block_size - 1) // self.block_size)
        return max(16, min(n, cap))

    def init_request_state(self, req) -> None:
        req.detok = IncrementalDetokenizer(self.tokenizer, req.prompt_token_ids)
        if req.output_token_ids:
            req.text = req.detok.push(list(req.output_token_ids))
            req.sent_text_len = len(req.text)
            req.sent_tokens = req.num_output_tokens
        if req.params.seed is not None:
            req.generator = torch.Generator(device=self.device).manual_seed(req.params.seed)

    def execute(self, batch):
        """Forward all scheduled tokens; return (requests to sample, their last-position logits)."""
        if self.graphs is not None and len(batch.reqs) <= self.graphs.max_batch and all(
                n == 1 and r.num_computed_tokens + 1 == r.num_tokens for r, n in zip(batch.reqs, batch.num_new_tokens)):
            return list(batch.reqs), self.graphs.run(batch.reqs)        # pure decode: CUDA graph replay
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        qsl = [0]
        seq_lens: list[int] = []
        tables: list[list[int]] = []
        sample_reqs, sample_rows = [], []
        for req, n in zip(batch.reqs, batch.num_new_tokens):
            start = req.num_computed_tokens
            input_ids.extend(req.all_token_ids[start:start + n])
            table = req.block_table
            positions.extend(range(start, start + n))
            _extend_slots(slots, table, start, start + n, bs)
            qsl.append(qsl[-1] + n)
            seq_lens.append(start + n)
            tables.append(table)
            if start + n == req.num_tokens:
                sample_reqs.append(req)
                sample_rows.append(qsl[-1] - 1)
        meta = self._metadata(qsl, seq_lens, tables, slots)
        dev = self.device
        ids = to_device(input_ids, torch.long, dev)
        pos = to_device(positions, torch.long, dev)
        hidden = self.model(ids, pos, self.kv_cache, meta)
        logits = None
        if sample_reqs:
            rows = hidden if len(sample_rows) == hidden.shape[0] else \
                hidden.index_select(0, to_device(sample_rows, torch.long, dev))
            logits = self.model.compute_logits(rows).float()
        return sample_reqs, logits

    def execute_ahead(self, reqs, input_ids: torch.Tensor) -> torch.Tensor:
        """A decode step launched before the previous step's tokens reached the host (asynchronous
        scheduling): each request computes position `num_computed_tokens` (== its host length), whose
        token id is still on the device in `input_ids` ([len(reqs)] long). Its KV block is already
        allocated. Returns the logits [len(reqs), vocab] (float32)."""
        if self.graphs is not None and len(reqs) <= self.graphs.max_batch:
            return self.graphs.run(reqs, input_ids)
        bs = self.block_size
        positions = [r.num_computed_tokens for r in reqs]
        slots = [r.block_table[p // bs] * bs + p % bs for r, p in zip(reqs, positions)]
        qsl = list(range(len(reqs) + 1))
        meta = self._metadata(qsl, [p + 1 for p in positions], [r.block_table for r in reqs], slots)
        hidden = self.model(input_ids, to_device(positions, torch.long, self.device), self.kv_cache, meta)
        return self.model.compute_logits(hidden).float()

    def _metadata(self, qsl, seq_lens, tables, slots) -> AttnMetadata:
        dev = self.device
        width = max(len(t) for t in tables)
        padded = [t + [0] * (width - len(t)) for t in tables]
        return AttnMetadata(
            query_start_loc=to_device(qsl, torch.int32, dev),
            seq_lens=to_device(seq_lens, torch.int32, dev),
            block_tables=to_device(padded, torch.int32, dev),
            slot_mapping=to_device(slots, torch.long, dev),
            max_query_len=max(b - a for a, b in zip(qsl, qsl[1:])),
            max_seq_len=max(seq_lens),
            query_start_loc_cpu=qsl, seq_lens_cpu=seq_lens, block_tables_cpu=tables)

    # -- KV block copies (export/import)
    def read_blocks(self, block_ids: list[int]) -> torch.Tensor:
        idx = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        return self.kv_cache.index_select(2, idx)

    def write_blocks(self, block_ids: list[int], data: torch.Tensor) -> None:
        idx = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        self.kv_cache.index_copy_(2, idx, data.to(device=self.device, dtype=self.dtype))
