"""Host memory available to this process: MemAvailable, bounded by the container's cgroup limit."""

from __future__ import annotations

from handlers import host_memory


def test_the_smaller_of_meminfo_and_the_cgroup_headroom_wins(monkeypatch):
    monkeypatch.setattr(host_memory, "meminfo_bytes", lambda field: 64 * 2**30)
    monkeypatch.setattr(host_memory, "cgroup_headroom", lambda: (8 * 2**30, "8.0 GiB left under this container's limit"))
    assert host_memory.available_host_memory() == (8 * 2**30, "8.0 GiB left under this container's limit")
    monkeypatch.setattr(host_memory, "cgroup_headroom", lambda: None)
    assert host_memory.available_host_memory()[0] == 64 * 2**30
    monkeypatch.setattr(host_memory, "meminfo_bytes", lambda field: None)
    assert host_memory.available_host_memory() is None


def test_this_linux_machine_reports_its_memavailable():
    value = host_memory.meminfo_bytes("MemAvailable")
    total = host_memory.meminfo_bytes("MemTotal")
    assert value is not None and total is not None and 0 < value <= total
