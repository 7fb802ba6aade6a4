"""The reference resource API server, for tests, demos and cloud teams (extra ``devcloud``).

The API it implements is described in docs/design.md#resource-api.

``python -m agent.devcloud --port 8080 --token T`` serves it; :func:`agent.devcloud.cli.main` is the command
line, :func:`agent.devcloud.app.create_app` the ASGI app. Importing this package does not import FastAPI.
"""

from agent.devcloud.knobs import Knobs

__all__ = ["Knobs"]
