"""An OpenAI-compatible HTTP server over a ProxyTuner (`proxytune serve`).

app.py holds the routes, schemas.py turns request bodies into engine requests, openai_format.py
shapes responses and stream chunks, scheduler.py runs the one engine thread that batches them.
"""
from .app import create_app
from .scheduler import Scheduler

__all__ = ["create_app", "Scheduler"]
