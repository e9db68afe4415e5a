"""`dejavu serve`: an OpenAI-compatible HTTP server, dense or sparse decode.

  protocol.py   the request schema, the OpenAI error object, validation
  scheduler.py  the continuous-batching loop: who runs next, one model step at a time
  metrics.py    Prometheus figures
  app.py        FastAPI routes, the API key, body limits, serve()
"""
from .app import Settings, serve

__all__ = ["Settings", "serve"]
