"""The operator's kopf settings as the CLI sets them (no API server needed)."""

from __future__ import annotations

import argparse

import kopf

from svcproxy.controller import main
from svcproxy.controller.handlers import configure_settings


def _settings(*argv: str) -> kopf.OperatorSettings:
    parser = argparse.ArgumentParser()
    main.configure(parser)
    settings = kopf.OperatorSettings()
    configure_settings(settings, parser.parse_args(list(argv)))
    return settings


def test_no_worker_limit_by_default() -> None:
    # A limit made a changing Service's events wait behind idle per-object workers.
    assert _settings().batching.worker_limit is None


def test_worker_limit_when_asked() -> None:
    assert _settings("--workers", "50").batching.worker_limit == 50


def test_watch_client_gives_up_after_the_server() -> None:
    s = _settings("--watch-server-timeout", "40")
    assert s.watching.server_timeout == 40
    assert s.watching.client_timeout == 70
