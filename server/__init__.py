"""server: the two-pass OpenAI-compatible server (API, serving logic, scheduler, engines)."""
