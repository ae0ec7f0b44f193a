"""An OpenAI-compatible HTTP server over a ProxyTuner (`proxytune serve`).

app.py holds the routes, schemas.py turns request bodies into engine requests, responses.py reads the
engine's results into response bodies and stream chunks (openai_format.py shapes each piece),
scheduler.py runs the one engine thread that batches them.
"""
from .app import create_app
from .scheduler import Scheduler

__all__ = ["create_app", "Scheduler"]
