"""Two local judge servers started at once (two steps side by side under `emlab run --gpus N`)
that both picked the same free port: the start lock makes the second choose another, so each
step gets a server of its own, and stopping one leaves the other answering. Real llama.cpp
servers on the embedded GGUF."""

from __future__ import annotations

import threading
import urllib.request
from contextlib import ExitStack
from urllib.parse import urlparse

import pytest
from emlab.judge import server
from support.judge import SERVER_JUDGE

pytestmark = pytest.mark.server


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/models", timeout=5) as reply:
            return reply.status == 200
    except OSError:
        return False


def test_two_servers_started_at_once_on_one_port_get_two_ports(monkeypatch: pytest.MonkeyPatch) -> None:
    real_free_port = server.free_port
    same = real_free_port()
    picks = iter([same, same])  # both starts race for one port, as two processes can
    monkeypatch.setattr(server, "free_port", lambda: next(picks, None) or real_free_port())

    urls: dict[str, str] = {}
    stacks = {name: ExitStack() for name in ("a", "b")}
    errors: list[BaseException] = []

    def start(name: str) -> None:
        try:
            urls[name] = stacks[name].enter_context(server.local_judge_server(SERVER_JUDGE))
        except Exception as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(name,)) for name in stacks]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        assert not errors, errors
        ports = {urlparse(url).port for url in urls.values()}
        assert len(ports) == 2 and same in ports
        assert all(_answers(url) for url in urls.values())
        stacks["a"].close()  # one step ends: its server stops, the other's keeps answering
        assert not _answers(urls["a"]) and _answers(urls["b"])
    finally:
        for stack in stacks.values():
            stack.close()
