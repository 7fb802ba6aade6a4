"""Typed settings from the environment, an env file and systemd credentials (docs/design.md#settings).

Every variable is ``EDGE_AGENT_`` + the field path joined by ``__`` (``EDGE_AGENT_MQTT__PORT``); a section may
also be given whole as JSON (``EDGE_AGENT_MQTT``), and a JSON object setting key by key
(``EDGE_AGENT_DECISION__KINDS__<kind>__<key>``). Secrets are ``SecretStr`` and may also come from files named like
the variable in ``$CREDENTIALS_DIRECTORY`` (systemd's ``LoadCredential=EDGE_AGENT_CLOUD__TOKEN:edge-agent.cloud-token``,
from ``/etc/credstore/``).

:func:`load_settings` is strict: an ``EDGE_AGENT_*`` name that is no setting (a typo would otherwise leave the
default in force unnoticed), a value that is not valid JSON where JSON is expected, and every validation problem
are all collected into one :class:`~agent.errors.ConfigError`, each naming its variable. The names in
:data:`NOT_SETTINGS` belong to the project's other commands and are let through.

The package, one concern a module: ``_names`` (which variables are settings), ``_sections``, ``_mqtt``,
``_routes``, ``_decision`` and ``_archive`` (the sections' models), ``_settings`` (the settings model and its sources),
``_loading`` (strict loading, problems named by variable) and ``_sources`` (reading again at a reload).
"""

from agent.config._archive import ArchiveSettings, RouteArchive
from agent.config._decision import DecisionSettings, KindPrior, default_kind_priors
from agent.config._loading import DEFAULT_ENV_FILE, RouteCheck, load_settings
from agent.config._mqtt import BrokerNode, MqttSettings, TlsSettings
from agent.config._names import (
    ENV_PREFIX,
    NOT_SETTINGS,
    closest,
    did_you_mean,
    leaves,
    strip_optional,
    variable,
)
from agent.config._routes import Route, default_routes
from agent.config._sections import (
    CloudSettings,
    DeadLetterSettings,
    LocalSettings,
    LogSettings,
    MetricsSettings,
    StoreSettings,
)
from agent.config._settings import Settings, default_state_dir, redacted
from agent.config._sources import RELOADABLE, Reread, Sources, changed_variables, split_reload

__all__ = [
    "DEFAULT_ENV_FILE",
    "ENV_PREFIX",
    "NOT_SETTINGS",
    "RELOADABLE",
    "ArchiveSettings",
    "BrokerNode",
    "CloudSettings",
    "DeadLetterSettings",
    "DecisionSettings",
    "KindPrior",
    "LocalSettings",
    "LogSettings",
    "MetricsSettings",
    "MqttSettings",
    "Reread",
    "Route",
    "RouteArchive",
    "RouteCheck",
    "Settings",
    "Sources",
    "StoreSettings",
    "TlsSettings",
    "changed_variables",
    "closest",
    "default_kind_priors",
    "default_routes",
    "default_state_dir",
    "did_you_mean",
    "leaves",
    "load_settings",
    "redacted",
    "split_reload",
    "strip_optional",
    "variable",
]
