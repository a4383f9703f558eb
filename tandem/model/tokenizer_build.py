"""Build the byte-level BPE tokenizer that `tandem model init` writes into a model directory.

A BPE is trained once with the `tokenizers` library on the small built-in corpus below (English prose,
dialogue, code, JSON) and cached in the user cache dir. Per preset it is then laid out like the real
tokenizer of the family: regular ids 0..R-1 (the trained BPE, then filler "words" up to R so every
regular id decodes to visible text — random-weight models sample all over the vocabulary), then the
family's special tokens at R, R+1, ... (Llama 3: 128000 = <|begin_of_text|>; Qwen: 151643 = <|endoftext|>).
ByteLevel pre-tokenizer and decoder: any UTF-8 text round-trips.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import tempfile
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BPE_VOCAB_TARGET = 3000   # trained tokens incl. the 256 byte symbols (the corpus caps it a bit lower)
_VERSION = 1

CORPUS = r"""
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Once upon a time, in a small village at the edge of the forest, there lived an old clockmaker. Every
morning he opened the shutters of his shop, wound the great clock above the door, and greeted the
people who walked past on their way to the market. The children loved to watch him work, because his
hands moved so carefully that the tiny gears seemed to fall into place by themselves.
"Why do you fix clocks?" asked a girl one day. "Because time is the only thing we all share," he said,
"and somebody should keep it honest."
Large language models are trained to predict the next token in a sequence of text. During inference,
a serving system first processes the prompt (the prefill phase), which is limited by compute, and then
generates the answer one token at a time (the decode phase), which is limited by memory bandwidth.
Continuous batching lets new requests join the running batch at every step, and a paged key-value
cache stores the attention keys and values in fixed-size blocks, so memory is not wasted on padding.
When many users ask questions at the same time, the scheduler must decide which requests to run,
which to keep waiting, and which to preempt when the cache is full. Latency matters for chat: the time
to the first token and the time per output token should stay low, even under bursts of traffic.
Summarization jobs send long documents and ask for short answers; they can wait a little longer.
The weather today is sunny with a few clouds in the afternoon. Tomorrow there is a chance of rain in
the north, with temperatures between 12 and 18 degrees. Please remember to bring an umbrella!
Dear team, thank you for your hard work this quarter. We shipped three major releases, fixed more than
two hundred bugs, and reduced the average response time by forty percent. Let's keep going.
Question: What is the capital of France? Answer: The capital of France is Paris.
Question: How many days are there in a week? Answer: There are seven days in a week.
Question: Can you explain what a function is? Answer: A function takes some inputs, does some work,
and returns a result. Functions help us split a big problem into small pieces that are easy to test.
User: Hello! Can you help me write a short poem about the sea?
Assistant: Of course. Here is a short poem:
The sea is wide, the sea is deep, it sings the sailors off to sleep;
it keeps the secrets of the shore, and whispers them forevermore.
User: That is lovely, thank you. Could you make it rhyme in a different way?
Assistant: Sure, here is another version with a new rhyme scheme and a calmer rhythm.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 16 32 64 100 128 256 512 1000 1024 2048 4096 8192 65536.
Dates and times: 2024-01-15, 12:30:45, Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday.
Months: January, February, March, April, May, June, July, August, September, October, November, December.
Punctuation and symbols: ( ) [ ] { } < > + - * / = % & | ^ ~ ! ? @ # $ : ; , . ' " ` _ \ -- ... ->
Some words in other languages: café, naïve, résumé, über, señor, façade, crème brûlée, smörgåsbord,
Straße, déjà vu, piñata, jalapeño, Ελληνικά, русский язык, 日本語, 中文, 한국어, العربية, हिन्दी.
def fibonacci(n: int) -> list[int]:
    '''Return the first n Fibonacci numbers.'''
    result = []
    a, b = 0, 1
    for _ in range(n):
        result.append(a)
        a, b = b, a + b
    return result


class Request:
    def __init__(self, request_id: str, prompt: str, max_tokens: int = 16):
        self.request_id = request_id
        self.prompt = prompt
        self.max_tokens = max_tokens
        self.output_tokens = []

    def is_finished(self) -> bool:
        return len(self.output_tokens) >= self.max_tokens


import json
import os
import sys
from pathlib import Path

if __name__ == "__main__":
    path = Path(sys.argv[1])
    with open(path, "r", encoding="utf-8") as f:
        data = json.load(f)
    for key, value in sorted(data.items()):
        print(f"{key}: {value}")
    sys.exit(0)

function greet(name) {
  const message = `Hello, ${name}!`;
  console.log(message);
  return message;
}

const items = [1, 2, 3, 4, 5].map((x) => x * 2).filter((x) => x > 4);
export default { greet, items };

#include <stdio.h>
int main(int argc, char **argv) {
    for (int i = 0; i < argc; i++) {
        printf("%d: %s\n", i, argv[i]);
    }
    return 0;
}

SELECT id, name, created_at FROM users WHERE active = 1 ORDER BY created_at DESC LIMIT 10;
$ git commit -m "Fix the scheduler when the batch is full" && git push origin main
$ pip install -e '.[dev]' && python -m pytest -q tests/
{"model": "tiny", "messages": [{"role": "user", "content": "Hi there"}], "max_tokens": 32, "stream": true}
{"id": "cmpl-123", "object": "text_completion", "choices": [{"index": 0, "text": "ok", "finish_reason": "stop"}]}
The history of science is full of surprises. People once believed that the sun moved around the earth,
that disease came from bad air, and that heavy objects fall faster than light ones. Careful experiments
changed these ideas. Today we measure, we test, and we share our results so that others can check them.
A good engineer writes simple code, measures before optimizing, and leaves the system better than she
found it. Good tests are fast, deterministic, and easy to read; they explain what the code should do.
In the kitchen, mix two cups of flour with a pinch of salt, add warm water slowly, and knead the dough
for ten minutes. Let it rest for an hour, then shape it, bake it at 220 degrees, and enjoy fresh bread.
"""


def _cache_dir() -> Path:
    base = os.environ.get("TANDEM_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "tandem")
    return Path(base)


def _pretok():
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _train() -> tuple[dict[str, int], list[tuple[str, str]]]:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = _pretok()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB_TARGET, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    lines = CORPUS.splitlines()
    tok.train_from_iterator(lines * 2, trainer=trainer)
    data = json.loads(tok.to_str())
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in data["model"]["merges"]]
    return data["model"]["vocab"], merges


def trained_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of the corpus BPE; trained on first use and cached on disk."""
    key = hashlib.sha256(f"{_VERSION}|{BPE_VOCAB_TARGET}|{CORPUS}".encode()).hexdigest()[:16]
    path = _cache_dir() / f"bpe-{key}.json"
    try:
        d = json.loads(path.read_text())
        return d["vocab"], [tuple(m) for m in d["merges"]]
    except (OSError, ValueError, KeyError):
        pass
    vocab, merges = _train()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({"vocab": vocab, "merges": merges}, f)
        os.replace(tmp, path)
    except OSError:
        pass  # read-only home: train again next time
    return vocab, merges


_SYLLABLES = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + ["th", "sh", "ch", "st", "an", "er", "in", "on"]


def _fillers():
    """Endless distinct pseudo-words: ' ba', ' be', ..., ' baba', ... (Ġ is ByteLevel's space)."""
    for n in itertools.count(1):
        for combo in itertools.product(_SYLLABLES, repeat=n):
            yield "\u0120" + "".join(combo)


def build_tokenizer(regular: int, special_tokens: list[str], not_special: set[str] = frozenset(),
                    bos_token: str | None = None) -> Tokenizer:
    """Tokenizer with `regular` regular ids then `special_tokens`; BOS added by the post-processor when given."""
    vocab, merges = trained_bpe()
    if len(vocab) > regular:
        raise ValueError(f"trained BPE has {len(vocab)} tokens, more than the {regular} regular ids")
    vocab = dict(vocab)
    fill = _fillers()
    while len(vocab) < regular:
        w = next(fill)
        if w not in vocab:
            vocab[w] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = _pretok()
    tok.decoder = decoders.ByteLevel()
    for t in special_tokens:
        if t in not_special:
            tok.add_tokens([AddedToken(t, special=False, normalized=False)])
        else:
            tok.add_special_tokens([AddedToken(t, special=True, normalized=False)])
    if tok.get_vocab_size(with_added_tokens=True) != regular + len(special_tokens):
        raise AssertionError("special token ids are not contiguous after the regular ids")
    if bos_token is not None:
        bos_id = tok.token_to_id(bos_token)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A", pair=f"{bos_token} $A {bos_token} $B:1", special_tokens=[(bos_token, bos_id)])
    return tok
