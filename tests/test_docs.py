"""The documentation cannot drift from the code: the settings reference, the metric list, the front page."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from agent import settings_reference
from agent.config import Route, Settings

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
METRIC = re.compile(r"\bedge_agent_[a-z_]+")


def test_the_settings_reference_is_what_the_model_gives() -> None:
    page = (DOCS / "reference" / "configuration.md").read_text(encoding="utf-8")
    regenerate = "python -m agent.settings_reference > docs/reference/configuration.md"
    assert page == settings_reference.markdown(), f"the page is stale: {regenerate}"


def test_every_setting_and_route_key_is_on_the_reference_page() -> None:
    page = settings_reference.markdown()
    for path, field in settings_reference.leaves(Settings):
        assert field.description, path
        assert f"`{settings_reference.variable(path)}`" in page
    for key in Route.model_fields:
        assert f"| `{key}` |" in page


def test_a_setting_without_a_description_stops_the_generator(monkeypatch: pytest.MonkeyPatch) -> None:
    field = Settings.model_fields["max_payload_bytes"]
    monkeypatch.setattr(field, "description", None)
    with pytest.raises(ValueError, match="EDGE_AGENT_MAX_PAYLOAD_BYTES has no description"):
        settings_reference.markdown()


def _code_metrics() -> set[str]:
    names: set[str] = set()
    for path in (ROOT / "agent").rglob("*.py"):
        names |= set(METRIC.findall(path.read_text(encoding="utf-8")))
    return names


def test_every_metric_is_documented_and_the_dashboard_uses_only_real_ones() -> None:
    code = _code_metrics()
    assert "edge_agent_messages" in code and "edge_agent_intake_paused" in code
    listed = set(METRIC.findall((DOCS / "operations.md").read_text(encoding="utf-8")))
    exposed = lambda name: {name, f"{name}_total"}  # noqa: E731 - counters gain _total on /metrics
    assert [name for name in sorted(code) if not exposed(name) & listed] == []
    dashboard = set(METRIC.findall((ROOT / "deploy" / "grafana" / "edge-agent.json").read_text(encoding="utf-8")))
    base = {re.sub(r"_(total|bucket|sum|count)$", "", name) for name in dashboard}
    assert base - code == set()


def test_the_readme_is_a_front_page_whose_links_resolve() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 220
    assert "```mermaid" in readme
    for target in re.findall(r"\]\((?!https?://|#)([^)#\s]+)", readme):
        assert (ROOT / target).exists(), target


def test_nothing_points_outside_the_repository() -> None:
    pattern = re.compile(r"DESIGN §|STYLE\.md|\.\./shared|/work/shared")
    suffixes = {".py", ".md", ".json", ".service", ".sh", ".example"}
    offenders = []
    for folder in ("agent", "tests", "deploy", "systemd", "docs"):
        for path in (ROOT / folder).rglob("*"):
            if path.is_file() and path != Path(__file__) and path.suffix in suffixes:
                text = path.read_text(encoding="utf-8", errors="replace")
                offenders += [f"{path.relative_to(ROOT)}: {m.group(0)}" for m in pattern.finditer(text)]
    assert offenders == []


def test_the_example_env_file_names_every_setting() -> None:
    example = (ROOT / "deploy" / "agent.env.example").read_text(encoding="utf-8")
    missing = [settings_reference.variable(path) for path, _ in settings_reference.leaves(Settings)
               if settings_reference.variable(path) not in example]
    assert missing == []
