"""sglang_step35.server: the port a `sglang serve` (or a world-of-one dist init) binds later, and a start
that is interrupted."""

import socket

from sglang_step35.server import free_port


def test_free_port_is_below_the_ephemeral_range_and_bindable():
    # bind(0) and outgoing connections get ports from the ephemeral range: a port from there can be
    # taken by another connection before a slow CPU server binds it ("address already in use").
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        ephemeral_low = int(f.read().split()[0])
    ports = {free_port() for _ in range(8)}
    assert all(0 < p < min(ephemeral_low, 22000) for p in ports), ports  # 22000+: SGLang's dist-init ports
    assert len(ports) > 1  # random in the range: two test workers do not race for one port
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports.pop()))


def test_a_start_interrupted_before_health_leaves_no_process(monkeypatch, tmp_path):
    # Ctrl-C (or a test timeout) while `sglang serve` starts: nobody holds the server to stop it yet.
    import os
    import sys

    import pytest

    from sglang_step35 import server as server_mod

    srv = server_mod.SGLangServer(str(tmp_path))
    monkeypatch.setattr(srv, "command", lambda: [sys.executable, "-c", "import time; time.sleep(120)"])

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(server_mod.requests, "get", interrupted)
    with pytest.raises(KeyboardInterrupt):
        srv.start()
    assert srv.proc.poll() is not None  # stopped, and its process group with it
    with pytest.raises(ProcessLookupError):
        os.killpg(srv.proc.pid, 0)
