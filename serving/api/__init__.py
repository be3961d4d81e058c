"""The API side: the OpenAI-compatible front end (wire models, routes, SSE, errors, A/B routes, metrics),
its backends (the engine's, or remote servers for ``matta route``). Torch-free: ``matta route`` loads no model."""
