"""The OpenAI-compatible HTTP server and its chat page (python_demo/server.py is the CLI).

cli (flags, engines) -> app (routes) -> conversation (request -> TurnRequest, refusals) ->
pool (FIFO queue, one worker per engine, the session's producer) -> render (SSE or whole);
guard (API key, body size), errors (OpenAI error JSON), schema (wire format), page.html.
"""
