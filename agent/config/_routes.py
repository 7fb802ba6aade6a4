"""Routes: which topics the agent subscribes to, and the task each one's messages become."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from agent.config._archive import RouteArchive
from agent.decision import Placement
from agent.mqtt.topics import validate_topic_filter


class Route(BaseModel):
    """One subscription and the task its messages become. Keys other than these are task options."""

    model_config = ConfigDict(frozen=True, extra="allow")

    topic: str = Field(description="MQTT topic filter to subscribe to (`+` and `#` wildcards); the first "
                       "route whose filter matches a message's topic takes it")
    task: str = Field(description="the task its messages become: a built-in (`sensor.stats`, `noise.spectrum`) "
                      "or a user task's entry-point name")
    placement: Placement = Field(
        default="auto", description="`auto`: the total-time model decides per task; `local` or `cloud` fix it")
    qos: Literal[0, 1] = Field(
        default=1, description="subscription QoS. 1: acknowledged only after the commit, never lost; "
        "0: at most once; a message that arrives while the store is full is dropped (logged as "
        "`qos0_message_dropped_store_full`)")
    archive: RouteArchive | None = Field(
        default=None, description="keep the route's raw inputs: `{\"days\": D, \"retrievals_per_month\": R}` "
        "(docs/archive.md)")

    @field_validator("topic")
    @classmethod
    def _topic(cls, value: str) -> str:
        return validate_topic_filter(value)

    @field_validator("task")
    @classmethod
    def _task(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the task name must not be empty")
        return value

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


def default_routes() -> list[Route]:
    return [
        Route(topic="city/+/+/+/data", task="sensor.stats"),
        Route(topic="city/+/noise/+/pcm", task="noise.spectrum"),
    ]
