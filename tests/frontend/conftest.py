"""One shared server for the frontend tests (session scope: started once, always stopped)."""
from __future__ import annotations

import pytest

from tests.frontend.serverutil import ServerProc

API_KEY = "test-key-123"


@pytest.fixture(scope="session")
def server(llama_dir):
    # small context (bounded generations for schemathesis) and small admission limits (429 test):
    # capacity 4 run slots + waiting room 8 -> in-flight limits interactive 12, standard 8, batch 6
    s = ServerProc(["--model", llama_dir, "--served-model-name", "tiny", "--max-model-len", "64",
                    "--max-num-seqs", "4", "--max-waiting", "8"], workers=1, api_key=API_KEY)
    try:
        yield s.wait_ready()
    finally:
        s.stop()


@pytest.fixture(scope="session")
def oai(server):
    import openai
    return openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def tokenizer(llama_dir):
    from tandem.engine.tokenizer import Tokenizer
    return Tokenizer(llama_dir)
