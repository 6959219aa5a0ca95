"""HTTP routes: `openai` (the OpenAI-compatible API) and `ops` (health, readiness, metrics)."""
