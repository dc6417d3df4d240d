"""``statetune serve``: an OpenAI-compatible HTTP server for a base model and its tuned states.

The modules each do one job: ``command`` (options and start-up), ``registry`` (the states of ``--states``
DIR, by name), ``batcher`` (the one thread that owns the decoding engine), ``prompts`` (requests to token
ids and sampling parameters), ``schemas`` (the request bodies), ``responses`` (OpenAI response and chunk
bodies), ``guard`` (API key and body size), ``app`` (the routes) and ``server`` (uvicorn with a drain on
shutdown). FastAPI and uvicorn come with ``pip install statetune[serve]``.
"""
