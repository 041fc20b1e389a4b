"""The docker target acts on one compose project only (a fake engine, no Docker needed)."""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field
from typing import Any

import pytest

from loadtest import drill
from loadtest.targets import SCENARIOS, DockerTarget, DrillError


@dataclass
class FakeContainer:
    name: str
    project: str
    service: str
    status: str = "running"
    number: int = 1
    labels: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        self.labels = {
            "com.docker.compose.project": self.project,
            "com.docker.compose.service": self.service,
            "com.docker.compose.container-number": str(self.number),
        }


class FakeContainers:
    def __init__(self, all_: list[FakeContainer]) -> None:
        self.all = all_
        self.filters: list[Any] = []

    def list(self, all: bool, filters: dict[str, Any]) -> list[FakeContainer]:
        self.filters.append(filters)
        wanted = [f for f in filters.get("label", []) if "=" in f]
        return [
            c
            for c in self.all
            if all and all_labels_match(c, wanted) and "com.docker.compose.service" in c.labels
        ]


def all_labels_match(c: FakeContainer, wanted: list[str]) -> bool:
    return all(c.labels.get(k) == v for k, v in (w.split("=", 1) for w in wanted))


class FakeClient:
    def __init__(self, containers: list[FakeContainer]) -> None:
        self.containers = FakeContainers(containers)

    def ping(self) -> bool:
        return True


def fake_engine(monkeypatch: pytest.MonkeyPatch, containers: list[FakeContainer]) -> FakeClient:
    client = FakeClient(containers)
    module = types.ModuleType("docker")
    module.from_env = lambda: client  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "docker", module)
    return client


OTHER = [
    FakeContainer("other_balancer-a_1", "other", "balancer-a"),
    FakeContainer("other_balancer-b_1", "other", "balancer-b"),
    FakeContainer("other_backend_1", "other", "backend"),
]


def test_refuses_a_project_that_is_not_running(monkeypatch: pytest.MonkeyPatch) -> None:
    stopped = [FakeContainer("lbtestbed_backend_1", "lbtestbed", "backend", status="exited")]
    client = fake_engine(monkeypatch, [*OTHER, *stopped])
    with pytest.raises(DrillError, match=r"^compose project 'lbtestbed' is not running;"):
        DockerTarget(project="lbtestbed").setup(SCENARIOS["kill-backend"])
    # asked the engine for this project's containers only
    assert client.containers.filters == [
        {"label": ["com.docker.compose.service", "com.docker.compose.project=lbtestbed"]}
    ]


def test_never_picks_another_projects_containers(monkeypatch: pytest.MonkeyPatch) -> None:
    # ours has backends but no balancers; the other project's balancers must not be used
    ours = [FakeContainer("lbtestbed_backend_1", "lbtestbed", "backend")]
    fake_engine(monkeypatch, [*OTHER, *ours])
    target = DockerTarget(project="lbtestbed")
    with pytest.raises(DrillError, match="missing balancer-a, balancer-b"):
        target.setup(SCENARIOS["kill-active-balancer"])
    assert target.containers == {}


def test_project_comes_from_compose_project_name(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_engine(monkeypatch, OTHER)
    monkeypatch.setenv("COMPOSE_PROJECT_NAME", "mine")
    assert drill.main(["kill-backend", "--json", "x.json", "--quiet"]) == 2
    assert capsys.readouterr().err == (
        "drill: compose project 'mine' is not running; start it with `make up` "
        "or set COMPOSE_PROJECT_NAME to the project to drill\n"
    )
    monkeypatch.delenv("COMPOSE_PROJECT_NAME")
    assert drill.build_parser().parse_args(["kill-backend", "--json", "x"]).project == "lbtestbed"
