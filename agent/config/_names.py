"""Which variables are settings: the variable of each setting, what a variable sets, and what a misspelt name
most likely meant. Walks any settings model given as ``root``; imports none of them."""

from __future__ import annotations

import difflib
import json
import re
import types
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

ENV_PREFIX = "EDGE_AGENT_"
# Names under the prefix that are not the agent's settings but belong to the project's other commands, which
# operators may export in the same shell or unit as the agent: the agent accepts them and never reads them.
NOT_SETTINGS = {
    "EDGE_AGENT_DEVCLOUD_TOKEN": "the bearer token of `edge-agent devcloud`",
}
UNKNOWN = "unknown setting"


def strip_optional(annotation: Any) -> Any:
    """``X | None`` → ``X``; any other annotation as it is."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def model_of(annotation: Any) -> type[BaseModel] | None:
    annotation = strip_optional(annotation)
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def entry_model(annotation: Any) -> type[BaseModel] | None:
    """The model of each entry of a JSON object setting (``dict[str, KindPrior]`` → KindPrior)."""
    annotation = strip_optional(annotation)
    return model_of(get_args(annotation)[1]) if get_origin(annotation) is dict else None


def leaves(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, FieldInfo]]:
    """Every setting as (dotted path, field), nested models flattened in declaration order."""
    for name, field in model.model_fields.items():
        path = f"{prefix}.{name}" if prefix else name
        inner = model_of(field.annotation)
        if inner is not None:
            yield from leaves(inner, path)
        else:
            yield path, field


def sections(model: type[BaseModel], prefix: str = "") -> Iterator[str]:
    """Every nested model's dotted path (``mqtt``, ``mqtt.tls``): each may also be given whole as JSON."""
    for name, field in model.model_fields.items():
        inner = model_of(field.annotation)
        if inner is not None:
            path = f"{prefix}.{name}" if prefix else name
            yield path
            yield from sections(inner, path)


def variable(path: str) -> str:
    """The variable of a dotted setting path: ``mqtt.tls.ca_file`` → ``EDGE_AGENT_MQTT__TLS__CA_FILE``."""
    return ENV_PREFIX + path.replace(".", "__").upper()


def prefixed(name: str) -> bool:
    return name[: len(ENV_PREFIX)].upper() == ENV_PREFIX


def target(root: type[BaseModel], name: str) -> Any:
    """What a variable sets below ``root`` (a section's model, a setting's type, an entry of a JSON object setting),
    or None when it sets nothing. Case-insensitive, as the settings are."""
    annotation: Any = root
    for part in name[len(ENV_PREFIX):].lower().split("__"):
        model = model_of(annotation)
        if model is not None:
            field = model.model_fields.get(part)
            if field is None:
                return None
            annotation = field.annotation
        elif get_origin(strip_optional(annotation)) is dict and part:
            # pydantic-settings fills a JSON object setting key by key: EDGE_AGENT_DECISION__KINDS__<kind>[__<key>]
            annotation = get_args(strip_optional(annotation))[1]
        else:
            return None
    return strip_optional(annotation)


def screen(root: type[BaseModel], name: str, value: str | None) -> str | None:
    """Why the agent will not read the variable ``name`` into ``root``: it is no setting (:data:`UNKNOWN`), or its
    value is not the JSON it must be. None when it will, and for names outside the prefix or in
    :data:`NOT_SETTINGS`."""
    if not prefixed(name) or name.upper() in NOT_SETTINGS:
        return None
    found = target(root, name)
    if found is None:
        return UNKNOWN
    if value is not None and (model_of(found) is not None or get_origin(found) in (list, dict)):
        try:
            json.loads(value)
        except json.JSONDecodeError as exc:
            return f"not valid JSON ({exc})"
        except (ValueError, RecursionError):
            return "not valid JSON"
    return None


def closest(given: str, choices: Iterable[str]) -> list[str]:
    """The choices ``given`` most likely misspells: one equal to it but for case and the number of underscores
    in a row (``MQTT_HOST`` for ``MQTT__HOST``), else the most similar ones (difflib), at most three."""

    def fold(text: str) -> str:
        return re.sub("_+", "_", text.upper())

    unique = list(dict.fromkeys(choices))
    same = [choice for choice in unique if fold(choice) == fold(given)]
    if same:
        return same[:3]
    scored = sorted(((difflib.SequenceMatcher(None, given.upper(), choice.upper()).ratio(), choice)
                     for choice in unique), key=lambda pair: (-pair[0], pair[1]))
    best = scored[0][0] if scored else 0.0
    return [choice for ratio, choice in scored if ratio >= max(0.6, best - 0.02)][:3]


def suggestion(found: Sequence[str]) -> str:
    """`` — did you mean X?`` (or ``X or Y?``), or nothing when nothing was found."""
    if not found:
        return ""
    listed = found[0] if len(found) == 1 else f"{', '.join(found[:-1])} or {found[-1]}"
    return f" — did you mean {listed}?"


def did_you_mean(given: str, choices: Iterable[str]) -> str:
    """:func:`suggestion` of the :func:`closest` choices."""
    return suggestion(closest(given, choices))

