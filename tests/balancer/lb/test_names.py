"""Backend names: the validity rule and names from Docker's reverse DNS."""

from __future__ import annotations

import pytest

from balancer.lb.names import replica_name, valid_name


@pytest.mark.parametrize(
    ("ptr", "service", "name"),
    [
        ("lbtestbed_backend_3.lbtestbed_lbnet", "backend", "backend-3"),  # Compose v1
        ("lbtestbed-backend-3.lbtestbed_lbnet", "backend", "backend-3"),  # Compose v2
        ("lbtestbed-backend-12.lbtestbed_lbnet.", "backend", "backend-12"),  # trailing dot
        ("lb-testbed-backend-2.lb-testbed_lbnet", "backend", "backend-2"),  # `-` in project
        ("lb_test_bed_backend_7.lb_test_bed_lbnet", "backend", "backend-7"),
        ("LBTESTBED_BACKEND_4.LBTESTBED_LBNET", "backend", "backend-4"),  # DNS ignores case
        ("lbtestbed-backend-03", "backend", "backend-3"),  # no network suffix, leading 0
        ("lbtestbed_my-api_2.net", "my-api", "my-api-2"),  # a service with a `-`
        ("backend-5", "backend", "backend-5"),  # no project prefix
    ],
)
def test_replica_names_of_both_compose_versions(ptr: str, service: str, name: str) -> None:
    assert replica_name(ptr, service) == name


@pytest.mark.parametrize(
    ("ptr", "service"),
    [
        ("lbtestbed_balancer-a_1.lbtestbed_lbnet", "backend"),  # another service
        ("lbtestbed_backend.lbtestbed_lbnet", "backend"),  # no replica number
        ("lbtestbed_backend_x.lbtestbed_lbnet", "backend"),
        ("lbtestbed_mybackend_1.net", "backend"),  # `backend` only as a suffix of a word
        ("d6cda8979528", "backend"),  # a container ID
        ("localhost", "backend"),
        ("", "backend"),
        ("lbtestbed_backend_1", ""),
    ],
)
def test_other_names_are_not_replicas(ptr: str, service: str) -> None:
    assert replica_name(ptr, service) is None


@pytest.mark.parametrize("name", ["b1", "backend-3", "B.2", "a_b", "x" * 63, "9"])
def test_valid_names(name: str) -> None:
    assert valid_name(name)


@pytest.mark.parametrize("name", ["", "-b", ".b", "_b", "a b", "h:1", "b/1", "é", "x" * 64, "a\n"])
def test_invalid_names(name: str) -> None:
    assert not valid_name(name)
