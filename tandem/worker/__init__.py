"""Worker: one process hosting one engine, driven over ZeroMQ + msgpack.

`tandem.worker.protocol` is torch-free (the frontend imports it); `tandem.worker.proc` is the process
main and imports the engine (and so torch) — only worker processes import it.
"""
