"""Prompts of an exact token length, with real shared prefixes.

A prompt is a sequence of *units*: token ids (mode ``ids``) or words (mode ``text``). The first
``len(hash_ids) * block_size`` units are made of blocks, one per hash id, generated
deterministically from (seed, namespace, hash id): equal hash ids give equal units, so two Mooncake
requests whose ``hash_ids`` agree on their first k blocks share exactly their first k*512 tokens
(the last block of a prompt may be partial: it is the prefix of that block). Units after the blocks
are unique to the request (seeded by its index).

Modes:
- ``ids``: the prompt is a list of token ids sent as ``prompt`` of /v1/completions (vLLM, SGLang
  and Tandem accept this). ISL is exact and no tokenizer is needed. Ids are drawn from
  ``token_range`` (default 10..250, valid for any real vocabulary and for the tiny test model);
  with a tokenizer, from its non-special vocabulary.
- ``text`` with a tokenizer (``--tokenizer DIR`` holding tokenizer.json): words that are single
  tokens of that vocabulary, joined by spaces, then checked with the tokenizer and trimmed or padded
  until the count (special tokens the tokenizer adds included) is exact.
- ``text`` without a tokenizer: common English words, about one token each (approximate ISL).
"""
from __future__ import annotations

import json
import os
import re
from collections import OrderedDict

import numpy as np

from tandem.bench.traces import BenchRequest

DEFAULT_TOKEN_RANGE = (10, 250)

# Frequent short English words: one token each in GPT-2/Llama-3/Qwen/Mistral vocabularies.
_COMMON_WORDS = (
    "the of and to in is was for that with as on by at from his her an be this which or had are "
    "but not were have one all their they also its been has new first more after who two other "
    "time when some into can only most over such may than these years then about would there used "
    "between many she later well year under while during three made known being part since where "
    "both world city early state through high became several each however back school work same "
    "name people found small area family before use second government like any called around "
    "long music system until including life day north did well end against group series third "
    "public based number house film must another played team water left because very power center "
    "still game order began line south local place four within few major will without large best "
    "took even form set war point five along war history could make book great land good church "
    "around best light early field party road same what little right side case head show main "
    "young among top just play open run given age men army off home near help art hand six much"
).split()


class PromptError(ValueError):
    pass


def load_tokenizer(path: str):
    """A `tokenizers.Tokenizer` from DIR/tokenizer.json (or the file itself)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:  # pragma: no cover
        raise PromptError("--tokenizer needs the `tokenizers` package") from None
    f = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(f):
        raise PromptError(f"no tokenizer.json at {path}")
    try:
        return Tokenizer.from_file(f)
    except Exception as e:  # noqa: BLE001
        raise PromptError(f"cannot load tokenizer {f}: {e}") from None


def _seed_key(*parts: int) -> list[int]:
    return [int(p) % (1 << 63) for p in parts]


class PromptBuilder:
    """Builds the `prompt` (JSON text, or token ids / text) for a `BenchRequest`."""

    def __init__(self, mode: str = "ids", tokenizer=None, token_range: tuple[int, int] | None = None,
                 seed: int = 0, cache_blocks: int = 20000):
        if mode not in ("ids", "text"):
            raise PromptError(f"unknown prompt mode {mode!r}; expected ids or text")
        self.mode = mode
        self.tok = tokenizer
        self.seed = seed
        self._cache: OrderedDict = OrderedDict()
        self._cache_max = cache_blocks
        self.n_special = 0
        if mode == "ids":
            if token_range is None and tokenizer is not None:
                vocab = self._plain_vocab_ids(tokenizer)
                self._ids = np.array(vocab, dtype=np.int64)
            else:
                lo, hi = token_range or DEFAULT_TOKEN_RANGE
                if not 0 <= lo < hi:
                    raise PromptError(f"bad token range {lo}:{hi}")
                self._ids = np.arange(lo, hi, dtype=np.int64)
            self._units = np.array([str(i) for i in self._ids.tolist()], dtype=object)
        else:
            if tokenizer is not None:
                words = self._single_token_words(tokenizer)
                self.n_special = len(tokenizer.encode("", add_special_tokens=True).ids)
            else:
                words = [" " + w for w in dict.fromkeys(_COMMON_WORDS)]
            self._units = np.array(words, dtype=object)

    # ------------------------------------------------------------------ vocab helpers
    @staticmethod
    def _plain_vocab_ids(tok) -> list[int]:
        try:
            specials = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        except Exception:  # noqa: BLE001  (older tokenizers)
            specials = set()
        n = tok.get_vocab_size(with_added_tokens=False)
        ids = [i for i in range(n) if i not in specials]
        if not ids:
            raise PromptError("tokenizer has an empty vocabulary")
        return ids

    @staticmethod
    def _single_token_words(tok, limit: int = 4000) -> list[str]:
        pat = re.compile(r" [a-z]{2,12}")
        words: list[str] = []
        vocab = tok.get_vocab(with_added_tokens=False)
        for tid in sorted(vocab.values()):
            s = tok.decode([tid], skip_special_tokens=True)
            if not pat.fullmatch(s):
                continue
            if tok.encode(s, add_special_tokens=False).ids != [tid]:
                continue
            # two copies must give two tokens (the tokenizer does not merge across words)
            if len(tok.encode(s + s, add_special_tokens=False).ids) != 2:
                continue
            words.append(s)
            if len(words) >= limit:
                break
        if len(words) < 16:
            raise PromptError("the tokenizer has too few single-token words for exact text prompts; "
                              "use --prompt-mode ids (token-id prompts)")
        return words

    # ------------------------------------------------------------------ units
    def _gen(self, key: list[int], n: int) -> list[str]:
        rng = np.random.default_rng(key)
        return self._units[rng.integers(0, len(self._units), n)].tolist()

    def _block(self, ns: int, h: int, size: int) -> list[str]:
        key = (ns, h, size)
        b = self._cache.get(key)
        if b is None:
            b = self._gen(_seed_key(self.seed, 1, ns, h, size), size)
            self._cache[key] = b
            if len(self._cache) > self._cache_max:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return b

    def units(self, req: BenchRequest, n: int | None = None) -> list[str]:
        """The first n (default isl) units of the request's prompt."""
        n = req.isl if n is None else n
        out: list[str] = []
        bs = req.block_size
        for h in req.hash_ids:
            if len(out) >= n:
                break
            blk = self._block(req.namespace, h, bs)
            need = n - len(out)
            out.extend(blk if need >= bs else blk[:need])
        if len(out) < n:
            out.extend(self._gen(_seed_key(self.seed, 2, req.namespace, req.idx), n - len(out)))
        return out

    # ------------------------------------------------------------------ public
    def token_ids(self, req: BenchRequest) -> list[int]:
        if self.mode != "ids":
            raise PromptError("token_ids() needs prompt mode ids")
        return [int(u) for u in self.units(req)]

    def text(self, req: BenchRequest) -> str:
        if self.mode != "text":
            raise PromptError("text() needs prompt mode text")
        target = max(req.isl - self.n_special, 1)
        if self.tok is None:
            return "".join(self.units(req, target)).lstrip()
        n = target
        best = None
        for _ in range(6):
            s = "".join(self.units(req, n))
            got = len(self.tok.encode(s, add_special_tokens=True).ids)
            if best is None or abs(got - req.isl) < best[0]:
                best = (abs(got - req.isl), s)
            if got == req.isl:
                return s
            n = max(1, n + (req.isl - got))
        return best[1]

    def prompt_json(self, req: BenchRequest) -> str:
        """JSON text of the `prompt` value: a list of ids, or a string."""
        if self.mode == "ids":
            return "[" + ",".join(self.units(req)) + "]"
        return json.dumps(self.text(req))
