"""``python -m agent.devcloud`` runs the reference resource API server."""

from agent.devcloud.cli import main

raise SystemExit(main())
