"""Offline API: `LLM(model_dir).generate(prompts, SamplingParams(...))`."""
from __future__ import annotations

from dataclasses import dataclass, field

from tandem.common.sampling import SamplingParams
from tandem.engine.config import EngineConfig
from tandem.engine.engine import Engine


@dataclass
class CompletionOutput:
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[dict] = field(default_factory=list)
    num_cached_tokens: int = 0


class LLM:
    def __init__(self, model: str, **engine_kwargs):
        self.engine = Engine(EngineConfig(model=str(model), **engine_kwargs))
        self.tokenizer = self.engine.tokenizer
        self._counter = 0

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None,
                 priority: str = "interactive") -> list[CompletionOutput]:
        """One output per prompt (a string or a list of token ids), in order."""
        single = isinstance(prompts, str) or (prompts and isinstance(prompts[0], int))
        if single:
            prompts = [prompts]
        params = params or SamplingParams()
        plist = params if isinstance(params, list) else [params] * len(prompts)
        outs: dict[str, CompletionOutput] = {}
        order = []
        for p, sp in zip(prompts, plist):
            rid = f"llm-{self._counter}"
            self._counter += 1
            ids = self.tokenizer.encode(p) if isinstance(p, str) else list(p)
            self.engine.add_request(rid, ids, sp, priority)
            outs[rid] = CompletionOutput(ids)
            order.append(rid)
        while self.engine.has_unfinished_requests():
            for d in self.engine.step():
                o = outs[d.request_id]
                o.token_ids.extend(d.new_token_ids)
                o.text += d.new_text
                o.logprobs.extend(d.logprobs or [])
                o.num_cached_tokens = d.num_cached_tokens
                if d.finished:
                    o.finish_reason = d.finish_reason
        return [outs[r] for r in order]
