"""Tokenizer of a Hugging Face model directory (`tokenizer.json` + `tokenizer_config.json`), without
transformers: the `tokenizers` library for encode/decode, a sandboxed jinja2 env for chat templates,
and `IncrementalDetokenizer` for streaming text one token at a time.

Torch-free, so the frontend can use it.
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Sequence

import tokenizers

from tandem.common.errors import InvalidParams, ModelDirError


def _read_json(p: Path) -> dict:
    if not p.is_file():
        return {}
    try:
        d = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelDirError(f"{p}: malformed JSON ({e})") from None
    return d if isinstance(d, dict) else {}


def _token_str(t: Any) -> str | None:
    """tokenizer_config stores special tokens as a string or as {"content": ...}."""
    if isinstance(t, dict):
        return t.get("content")
    return t if isinstance(t, str) else None


def _ids(v: Any) -> list[int]:
    if v is None:
        return []
    return [int(v)] if isinstance(v, int) else [int(x) for x in v]


class Tokenizer:
    def __init__(self, model_dir: str | Path):
        d = Path(model_dir)
        tj = d / "tokenizer.json"
        if not tj.is_file():
            raise ModelDirError(f"{str(d)!r} has no tokenizer.json")
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(tj))
        except Exception as e:
            raise ModelDirError(f"{tj}: cannot load tokenizer ({e})") from None
        cfg = _read_json(d / "tokenizer_config.json")
        gen = _read_json(d / "generation_config.json")
        mcfg = _read_json(d / "config.json")
        self.config = cfg

        self.bos_token: str | None = _token_str(cfg.get("bos_token"))
        self.eos_token: str | None = _token_str(cfg.get("eos_token"))
        self.pad_token: str | None = _token_str(cfg.get("pad_token"))
        self.bos_token_id: int | None = self._tok.token_to_id(self.bos_token) if self.bos_token else None
        if self.bos_token_id is None and self.bos_token is None and cfg.get("add_bos_token"):
            self.bos_token_id = mcfg.get("bos_token_id")
            if self.bos_token_id is not None:
                self.bos_token = self._tok.id_to_token(self.bos_token_id)
        eos: list[int] = []
        if self.eos_token and self._tok.token_to_id(self.eos_token) is not None:
            eos.append(self._tok.token_to_id(self.eos_token))
        for e in _ids(gen.get("eos_token_id")) + _ids(mcfg.get("eos_token_id")):
            if e not in eos:
                eos.append(e)
        self.eos_token_ids: list[int] = eos
        self.eos_token_id: int | None = eos[0] if eos else None
        # None: the tokenizer.json post-processor decides (Llama 3); True: prepend BOS ourselves if missing
        self.add_bos_token: bool | None = cfg.get("add_bos_token")

        tmpl = None
        if (d / "chat_template.jinja").is_file():
            tmpl = (d / "chat_template.jinja").read_text()
        else:
            tmpl = cfg.get("chat_template")
            if isinstance(tmpl, list):       # [{"name": "default", "template": ...}, ...]
                named = {t.get("name"): t.get("template") for t in tmpl if isinstance(t, dict)}
                tmpl = named.get("default") or next(iter(named.values()), None)
        self.chat_template: str | None = tmpl
        self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)
        self.model_max_length: int | None = cfg.get("model_max_length")
        added = self._tok.get_added_tokens_decoder()
        self.special_token_ids: frozenset[int] = frozenset(i for i, t in added.items() if t.special)

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. With add_special_tokens, BOS is added when the tokenizer adds it (once:
        a text already starting with the BOS token, e.g. a rendered chat template, gets no second one)."""
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        return self._fix_bos(ids) if add_special_tokens else ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        encs = self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return [self._fix_bos(e.ids) if add_special_tokens else e.ids for e in encs]

    def _fix_bos(self, ids: list[int]) -> list[int]:
        bos = self.bos_token_id
        if bos is None:
            return ids
        if self.add_bos_token and (not ids or ids[0] != bos):
            ids = [bos] + ids
        if len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
            ids = ids[1:]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; ids outside the tokenizer's vocab (padded model vocab) decode to nothing."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    def token_to_id(self, t: str) -> int | None:
        return self._tok.token_to_id(t)

    # ------------------------------------------------------------------ chat
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, **kwargs) -> str:
        """Render messages to a prompt string (encode it with add_special_tokens=False: templates add BOS)."""
        if not self.chat_template:
            raise InvalidParams("this model has no chat template; use /v1/completions with a plain prompt",
                                "messages")
        msgs = _normalize_messages(messages)
        import jinja2
        try:
            return _compile(self.chat_template).render(
                messages=msgs, add_generation_prompt=add_generation_prompt, tools=tools,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "",
                pad_token=self.pad_token or "", **kwargs)
        except jinja2.TemplateError as e:
            raise InvalidParams(f"chat template error: {e}", "messages") from None


def _normalize_messages(messages: Any) -> list[dict]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InvalidParams("messages must be a non-empty list", "messages")
    out = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise InvalidParams("each message must be an object with a string 'role'", "messages")
        c = m.get("content")
        if isinstance(c, list):  # OpenAI content parts: keep the text ones
            c = "".join(p.get("text", "") for p in c if isinstance(p, dict) and p.get("type", "text") == "text")
        elif c is None:
            c = ""
        elif not isinstance(c, str):
            raise InvalidParams("message content must be a string or a list of text parts", "messages")
        out.append({**m, "content": c})
    return out


@lru_cache(maxsize=16)
def _compile(template: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ModelDirError(f"chat template does not parse: {e}") from None


# ---------------------------------------------------------------------- streaming detokenization
_PROMPT_TAIL = 5     # prompt tokens kept as left context (as vLLM), so the first word's spacing is right


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas.

    vLLM's prefix/read-offset scheme: decode the window ids[prefix:] and emit what extends past the
    text of ids[prefix:read]; hold back while the text ends in U+FFFD (a UTF-8 character split across
    tokens). `flush()` returns what is still held (call it when the request finishes).
    Tokens that decode to nothing (skipped special tokens, ids beyond the tokenizer's vocab) are
    dropped up front so they never grow the window.
    """

    __slots__ = ("_decode", "_skip", "_vocab", "_ids", "_prefix", "_read", "_prefix_text", "skip_special_tokens")

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True):
        self._decode = tokenizer._tok.decode
        self.skip_special_tokens = skip_special_tokens
        self._skip = tokenizer.special_token_ids if skip_special_tokens else frozenset()
        self._vocab = tokenizer.vocab_size
        self._ids: list[int] = [i for i in list(prompt_ids)[-_PROMPT_TAIL:] if self._keep(i)]
        self._prefix = 0
        self._read = len(self._ids)
        self._prefix_text = self._decode(self._ids, skip_special_tokens=skip_special_tokens)

    def _keep(self, i: int) -> bool:
        return 0 <= i < self._vocab and i not in self._skip

    def push(self, new_ids: Iterable[int] | int) -> str:
        """Append new token ids; return the newly finalized text ('' when nothing is final yet)."""
        if isinstance(new_ids, int):
            new_ids = (new_ids,)
        added = False
        for i in new_ids:
            if 0 <= i < self._vocab and i not in self._skip:
                self._ids.append(i)
                added = True
        if not added:
            return ""
        new_text = self._decode(self._ids[self._prefix:], skip_special_tokens=self.skip_special_tokens)
        if len(new_text) <= len(self._prefix_text) or new_text.endswith("\ufffd"):
            return ""
        return self._advance(new_text)

    def flush(self) -> str:
        """Everything still held back (e.g. an incomplete UTF-8 sequence at the end)."""
        if self._read == len(self._ids):
            return ""
        new_text = self._decode(self._ids[self._prefix:], skip_special_tokens=self.skip_special_tokens)
        return self._advance(new_text) if len(new_text) > len(self._prefix_text) else ""

    def _advance(self, new_text: str) -> str:
        delta = new_text[len(self._prefix_text):]
        self._prefix, self._read = self._read, len(self._ids)
        if self._prefix > 64:              # keep the id list short
            del self._ids[:self._prefix]
            self._read -= self._prefix
            self._prefix = 0
        # decoded, not taken from `delta`: decoders such as Metaspace strip a leading space at the window start
        self._prefix_text = self._decode(self._ids[self._prefix:self._read],
                                         skip_special_tokens=self.skip_special_tokens)
        return delta
