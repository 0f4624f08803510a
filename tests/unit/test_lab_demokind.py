"""The kind demo's pure parts (lab/svcproxy_lab/demokind.py): its clients and their answers.

The client script runs here under ``sh`` with a stand-in ``curl`` on PATH (no network),
so the lines the parser reads are the ones the script really prints. Without a kind
cluster the demo says how to make one and stops before building or running anything.
"""

from __future__ import annotations

import argparse
import os
import stat
import subprocess
from pathlib import Path

import pytest

from svcproxy_lab import demo, demokind, demoplan
from svcproxy_lab.demokind import Answer

FAKE_CURL = """#!/bin/sh
# Answers in turn from $ANSWERS (one "exit body address" per line, - for nothing), as
# curl -w ' %{remote_ip}' would.
n=$(cat "$COUNT" 2>/dev/null || echo 0); n=$((n + 1)); echo "$n" > "$COUNT"
line=$(sed -n "${n}p" "$ANSWERS")
set -- $line
code=$1; body=$2; addr=$3
[ "$body" = - ] && body=
[ "$addr" = - ] && addr=
printf '%s %s' "$body" "$addr"
exit "$code"
"""


def run_script(tmp_path: Path, answers: list[str], count: int) -> str:
    curl = tmp_path / "bin" / "curl"
    curl.parent.mkdir()
    curl.write_text(FAKE_CURL)
    curl.chmod(curl.stat().st_mode | stat.S_IEXEC)
    (tmp_path / "answers").write_text("\n".join(answers) + "\n")
    env = {**os.environ, "PATH": f"{curl.parent}:{os.environ['PATH']}",
           "ANSWERS": str(tmp_path / "answers"), "COUNT": str(tmp_path / "count")}
    script = demokind.burst_script("http://echo-rr.ns.svc.cluster.local/hostname", count)
    return subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True,
                          check=True).stdout


def test_script_and_parser_read_each_request_in_order(tmp_path: Path) -> None:
    out = run_script(tmp_path, ["0 echo-5d-aaaaa 10.97.0.5", "7 - 10.97.0.5", "0 - 10.97.0.5",
                                "6 - -", "0 echo-5d-bbbbb 10.97.0.5"], 5)
    assert demokind.parse_answers(out) == [
        Answer("echo-5d-aaaaa", "10.97.0.5", 0),
        Answer(None, "10.97.0.5", 7),  # connection refused
        Answer(None, "10.97.0.5", 0),  # answered, but with nothing
        Answer(None, None, 6),  # the name did not resolve
        Answer("echo-5d-bbbbb", "10.97.0.5", 0),
    ]


def test_parser_ignores_other_lines() -> None:
    assert demokind.parse_answers("Defaulted container\nanswer:0 p 10.97.0.1\n\n") == [
        Answer("p", "10.97.0.1", 0)]


def test_failures_are_counted_by_curl_exit() -> None:
    answers = [Answer("p", "a", 0), Answer(None, "a", 7), Answer(None, "a", 7),
               Answer(None, "a", 0), Answer(None, None, 28)]
    assert demokind.failures(answers) == [
        "1 failed with an empty answer", "2 failed with curl exit 7", "1 failed with curl exit 28"]
    assert demokind.failures([Answer("p", "a", 0)]) == []


def test_one_client_pod_pinned_to_each_node_selected_by_no_service() -> None:
    pod = demokind.client_pod("svcproxy-worker2", "ns")
    assert pod["metadata"]["name"] == "client-svcproxy-worker2"
    assert pod["metadata"]["namespace"] == "ns"
    assert pod["spec"]["nodeName"] == "svcproxy-worker2"
    assert "hostNetwork" not in pod["spec"]  # its own network namespace, on the cluster network
    [container] = pod["spec"]["containers"]
    assert container["image"] == demokind.AGNHOST and container["imagePullPolicy"] == "Never"
    labels = pod["metadata"]["labels"]
    for s in demoplan.SERVICES:
        selector = demoplan.service_manifest(s, "ns")["spec"]["selector"]
        assert not selector.items() <= labels.items(), f"{s.name} would select the client"


def test_backends_answer_on_the_services_target_port() -> None:
    assert demokind.BACKEND["ports"] == [{"containerPort": demoplan.TARGET_PORT, "name": "http"}]
    assert f"--http-port={demoplan.TARGET_PORT}" in demokind.BACKEND["args"]


def test_missing_cluster_says_how_to_make_one(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "svcproxy.kubeconfig"
    msg = demokind.missing_cluster(kubeconfig, running=False)
    assert msg is not None and "make kind-up" in msg and str(kubeconfig) in msg
    kubeconfig.write_text("x")
    msg = demokind.missing_cluster(kubeconfig, running=False)
    assert msg is not None and "svcproxy-control-plane is not running" in msg
    assert demokind.missing_cluster(kubeconfig, running=True) is None


def test_demo_kind_without_a_cluster_exits_1_before_building_anything(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(demokind, "KIND_STATE", tmp_path)

    def no_build(*_: object) -> Path:
        raise AssertionError("the demo built the toolchain without a cluster to run on")

    monkeypatch.setattr(demokind, "ensure_toolchain", no_build)
    parser = argparse.ArgumentParser()
    demo.configure(parser)
    args = parser.parse_args(["--kind", "--out", str(tmp_path / "out")])
    assert args.kind
    assert demo.run(args) == 1
    err = capsys.readouterr().err
    assert "no kind cluster 'svcproxy'" in err and "make kind-up" in err
    assert not (tmp_path / "out").exists()
