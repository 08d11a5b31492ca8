"""The app's routers, one per part of the HTTP API; ``create_app`` includes them in this order."""

from __future__ import annotations

from lmcore.serve.routes import admin, feedback, generate, openai, playground, probes

ROUTERS = (playground.router, probes.router, generate.router, openai.router, feedback.router, admin.router)
