"""OpenAI-compatible HTTP frontend (FastAPI). Torch-free: it tokenizes, validates, admits, routes and
streams; worker processes run the engines."""
