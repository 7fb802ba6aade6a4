"""edge-agent: a smart-city gateway daemon that decides, per task, whether the gateway or the cloud finishes sooner."""

__version__ = "0.1.0"

__all__ = ["__version__"]
