"""Shared pytest fixtures. Each block says who it serves; add new fixtures in their own block."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# ============================================================================
# Lab fixtures: real OpenSSH hosts in network namespaces (tests/lab/netns.py)
#
# `lab` (session) is a 2-host lab; `lab_factory(n_hosts)` makes extra labs that
# close when the test ends. A test using either, or marked `@pytest.mark.lab`,
# is skipped with the reason when the lab cannot run here (not root, no sshd,
# no namespaces) -- except when CI is set to anything (CI=true, CI=1, ...),
# where that is a failure: CI must run them. MESHTUI_NO_LAB=1 turns the lab
# off on purpose (and so fails every lab test under CI).
# ============================================================================

try:  # tests/ has no __init__.py, so pytest puts tests/ itself on sys.path
    from lab import netns as lab_netns
except ModuleNotFoundError:  # tests/ became a package: the rootdir is on sys.path then
    from tests.lab import netns as lab_netns


@functools.cache
def _lab_unavailable() -> str | None:
    return lab_netns.lab_unavailable_reason()


def _require_lab() -> None:
    reason = _lab_unavailable()
    if reason is None:
        return
    ci = os.environ.get("CI")
    if ci:
        pytest.fail(f"CI={ci} needs the namespace lab, but it cannot run: {reason}", pytrace=False)
    pytest.skip(f"namespace lab unavailable: {reason}")


def pytest_report_header(config: pytest.Config) -> str:
    reason = _lab_unavailable()
    return "namespace lab: available" if reason is None else f"namespace lab: unavailable ({reason})"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Tests that use a lab fixture get the `lab` marker, so `-m "not lab"` deselects them.
    for item in items:
        if {"lab", "lab_factory"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.lab)


@pytest.fixture(autouse=True)
def _lab_marker_gate(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("lab") is not None:
        _require_lab()


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[lab_netns.Lab]:
    _require_lab()
    lab_netns.cleanup_stale()  # leftovers of killed runs; live labs of other sessions are kept
    with lab_netns.Lab(n_hosts=2, workdir=tmp_path_factory.mktemp("lab")) as the_lab:
        yield the_lab


@pytest.fixture
def lab_factory(tmp_path: Path) -> Iterator[Callable[..., lab_netns.Lab]]:
    _require_lab()
    made: list[lab_netns.Lab] = []

    def make(n_hosts: int = 2, **kwargs: object) -> lab_netns.Lab:
        kwargs.setdefault("workdir", tmp_path)
        new_lab = lab_netns.Lab(n_hosts, **kwargs)  # type: ignore[arg-type]
        made.append(new_lab)
        return new_lab

    yield make
    errors = []
    for made_lab in made:
        try:
            made_lab.close()
        except lab_netns.LabError as exc:  # report every lab's leftovers, not just the first
            errors.append(str(exc))
    if errors:
        pytest.fail("; ".join(errors), pytrace=False)


# ============================================================================
# end of lab fixtures
# ============================================================================
