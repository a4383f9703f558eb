"""KV-cache transfer between engines: prefill worker → decode worker.

The prefill worker keeps a finished request's blocks (`hold_kv`) and serves them from a `KVServer`;
the decode worker fetches them with `fetch_kv` (only the blocks it does not already hold), imports
them, and the server releases the blocks. Payloads: raw bytes over ZeroMQ for CPU and cross-host,
or a CUDA IPC handle of a staging copy on the same host (GPU→GPU, never through host memory).
Any failure or timeout returns None: the caller recomputes the prefill (nothing is lost).
"""
