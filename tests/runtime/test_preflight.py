"""Memory preflight: before loading, compare what the bundle needs with what this process
may still get (free RAM, or its cgroup's headroom), and refuse with the numbers.

In-process with psutil and the cgroup reader patched, on fake /proc and cgroup files for
both cgroup versions, and for real: `edgepack run` in a memory-limited cgroup v1 group
(root only), below the need (refuses fast) and above it (runs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

import edgepack
from edgepack.runtime import memory
from edgepack import runtime
from edgepack.errors import InsufficientMemoryError

MIB = 1024 * 1024


def _patch_memory(monkeypatch, available_bytes: int, rss_bytes: int = 100 * MIB, cgroup=None) -> None:
    import psutil

    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=available_bytes))
    monkeypatch.setattr(memory, "process_rss_bytes", lambda: rss_bytes)
    monkeypatch.setattr(memory, "cgroup_memory", lambda proc="/proc/self": cgroup)


def _need_bytes(bundle_dir: Path, overhead: int = runtime.NATIVE_OVERHEAD_BYTES) -> int:
    """Llama at 8 bits runs in edgepack's C engine (no torch): its overhead, not torch's."""
    manifest = json.loads((bundle_dir / "edgepack.json").read_text())
    return manifest["memory"]["weight_bytes"] + overhead


def test_refuses_with_numbers_when_ram_is_short(packed, monkeypatch):
    b = packed("llama", 8)
    need = _need_bytes(b)
    _patch_memory(monkeypatch, available_bytes=need - 100 * MIB - 50 * MIB, rss_bytes=100 * MIB)
    with pytest.raises(InsufficientMemoryError) as err:
        edgepack.load(b)
    assert f"needs about {need // MIB} MiB" in err.value.message
    assert f"holds 100 MiB and can get only {(need - 150 * MIB) // MIB} MiB more of free RAM" in err.value.message
    assert "--force" in err.value.hint


def test_loads_when_it_fits_and_with_force(packed, monkeypatch):
    b = packed("llama", 8)
    need = _need_bytes(b)
    _patch_memory(monkeypatch, available_bytes=need - 100 * MIB, rss_bytes=100 * MIB)
    assert edgepack.load(b).model is not None  # held + available == need: fits
    _patch_memory(monkeypatch, available_bytes=1 * MIB)
    assert edgepack.load(b, force=True).model is not None


def test_cgroup_limit_wins_over_free_ram(packed, monkeypatch, capsys):
    from edgepack import cli

    b = packed("llama", 8)
    group = memory.CgroupMemory(limit_bytes=256 * MIB, usage_bytes=200 * MIB, path="/fake")
    _patch_memory(monkeypatch, available_bytes=64 * 1024 * MIB, rss_bytes=20 * MIB, cgroup=group)
    assert cli.main(["run", str(b), "hello", "--max-new-tokens", "2"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "can get only 56 MiB more under its memory cgroup limit of 256 MiB" in captured.err
    assert "hint: " in captured.err and "Traceback" not in captured.err


def test_page_cache_is_dropped_before_refusing(packed, monkeypatch):
    b = packed("llama", 8)
    evicted = []
    _patch_memory(monkeypatch, available_bytes=1 * MIB, rss_bytes=10 * MIB)
    monkeypatch.setattr(memory, "evict_page_cache", lambda paths: evicted.extend(paths))
    with pytest.raises(InsufficientMemoryError):
        edgepack.load(b)
    assert sorted(p.name for p in evicted) == sorted(e["path"] for e in edgepack.load(b, force=True).manifest["files"])


# --- reading cgroup limits from /proc (fake files) -------------------------------------------


def _fake_proc(tmp_path: Path, cgroup: str, mountinfo: str) -> str:
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "cgroup").write_text(cgroup)
    (proc / "mountinfo").write_text(mountinfo)
    return str(proc)


def _group(path: Path, files: dict[str, str]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (path / name).write_text(text)


def test_cgroup_v1_nested_group_and_its_ancestors(tmp_path):
    mnt = tmp_path / "memory mnt"  # a space: mountinfo escapes it as \040
    _group(mnt / "outer", {"memory.limit_in_bytes": str(1024 * MIB), "memory.usage_in_bytes": str(900 * MIB)})
    _group(mnt / "outer" / "inner", {"memory.limit_in_bytes": str(512 * MIB), "memory.usage_in_bytes": str(300 * MIB),
                                      "memory.stat": f"cache 1\ntotal_inactive_file {50 * MIB}\n"})
    proc = _fake_proc(
        tmp_path,
        "5:cpu,cpuacct:/\n4:memory:/outer/inner\n0::/\n",
        f"35 31 0:32 / {str(mnt).replace(' ', chr(92) + '040')} rw,relatime - cgroup cgroup rw,memory\n"
        f"41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n",
    )
    group = memory.cgroup_memory(proc)
    # inner: 512 - (300 - 50) = 262 MiB; outer (binds too): 1024 - 900 = 124 MiB -> outer wins
    assert group.limit_bytes == 1024 * MIB and group.headroom_bytes == 124 * MIB


def test_cgroup_v2_with_a_mount_root_and_max(tmp_path):
    mnt = tmp_path / "cg2"
    _group(mnt / "app", {"memory.max": "max", "memory.current": "1"})
    _group(mnt / "app" / "worker", {"memory.max": str(2048 * MIB), "memory.current": str(1000 * MIB),
                                     "memory.stat": f"anon 5\ninactive_file {200 * MIB}\n"})
    # a container that mounts only its own subtree: the mount root is /kube/pod1
    proc = _fake_proc(
        tmp_path, "0::/kube/pod1/app/worker\n", f"30 1 0:26 /kube/pod1 {mnt} rw - cgroup2 cgroup2 rw,nsdelegate\n"
    )
    group = memory.cgroup_memory(proc)
    assert group.limit_bytes == 2048 * MIB and group.headroom_bytes == (2048 - 800) * MIB


def test_no_limit_no_controller_or_unreadable(tmp_path):
    mnt = tmp_path / "cg2"
    _group(mnt, {"memory.max": "max", "memory.current": "5"})
    assert memory.cgroup_memory(_fake_proc(tmp_path, "0::/\n", f"30 1 0:26 / {mnt} rw - cgroup2 cgroup2 rw\n")) is None
    assert memory.cgroup_memory(str(tmp_path / "nowhere")) is None
    v1_unlimited = tmp_path / "v1"
    _group(v1_unlimited, {"memory.limit_in_bytes": "9223372036854771712", "memory.usage_in_bytes": "5"})
    proc = tmp_path / "p2"
    proc.mkdir()
    (proc / "cgroup").write_text("4:memory:/\n")
    (proc / "mountinfo").write_text(f"35 31 0:32 / {v1_unlimited} rw - cgroup cgroup rw,memory\n")
    assert memory.cgroup_memory(str(proc)) is None


def test_budget_of_this_process_is_positive():
    budget = memory.budget()
    assert budget.available_bytes > 0 and budget.source in ("RAM", "cgroup limit")


# --- for real, under a memory-limited cgroup v1 group ------------------------------------------


@pytest.fixture
def memory_cgroup(tmp_path):
    """make(limit_bytes) -> a fresh cgroup v1 memory group directory; removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create a memory cgroup")
    mounted = None
    dirs = memory._memory_cgroup_dirs(Path("/proc/self/cgroup").read_text().splitlines(),
                                      Path("/proc/self/mountinfo").read_text().splitlines())
    parent = next((d for (d, _mnt), version in dirs if version == 1), None)
    if parent is None:  # no v1 memory hierarchy mounted: mount one (works where v2 lacks the controller)
        mounted = tmp_path / "cg"
        mounted.mkdir()
        if subprocess.run(["mount", "-t", "cgroup", "-o", "memory", "none", str(mounted)], capture_output=True).returncode:
            pytest.skip("cannot mount a cgroup v1 memory hierarchy here")
        parent = mounted
    made = []

    def make(limit_bytes: int) -> Path:
        group = parent / f"edgepack-test-{os.getpid()}-{len(made)}"
        group.mkdir()
        made.append(group)
        (group / "memory.limit_in_bytes").write_text(str(limit_bytes))
        if (group / "memory.memsw.limit_in_bytes").exists():  # no swapping out of the limit either
            (group / "memory.memsw.limit_in_bytes").write_text(str(limit_bytes))
        return group

    yield make
    for group in made:
        for _ in range(50):
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)
    if mounted is not None:
        subprocess.run(["umount", str(mounted)], capture_output=True)


def test_preflight_under_a_real_memory_limited_cgroup(packed, memory_cgroup, capsys):
    b = packed("llama", 8)
    need = _need_bytes(b)
    argv = ["run", str(b), "The capital of France", "--max-new-tokens", "8"]
    report = {"need_mib": need // MIB}

    below = memory_cgroup(need - 40 * MIB)  # the process itself (~30 MiB, no torch) still starts
    rc, out, err, seconds, _ = _run_peak(below, argv)
    report.update(refused_limit_mib=(need - 40 * MIB) // MIB, refused_seconds=round(seconds, 2))
    assert rc == 1 and out == "" and "Traceback" not in err, err
    assert f"needs about {need // MIB} MiB" in err and "memory cgroup limit" in err, err
    assert _oom_kills(below) == 0  # refused, not OOM-killed

    above = memory_cgroup(need + 100 * MIB)
    rc, out, err, seconds, peak_rss = _run_peak(above, argv)
    peak_charged = int((above / "memory.max_usage_in_bytes").read_text())
    report.update(ran_limit_mib=(need + 100 * MIB) // MIB, ran_seconds=round(seconds, 2),
                  peak_rss_mib=peak_rss // MIB, peak_cgroup_charge_mib=peak_charged // MIB)
    assert rc == 0 and out.strip() and _oom_kills(above) == 0, err
    with capsys.disabled():
        print(f"\ncgroup preflight: {report}")


def _oom_kills(group: Path) -> int:
    for line in (group / "memory.oom_control").read_text().splitlines():
        if line.startswith("oom_kill "):
            return int(line.split()[1])
    return 0


def _run_peak(group: Path, argv: list[str]) -> tuple[int, str, str, float, int]:
    """Like _run_in, and the child's peak RSS from wait4's rusage."""
    import tempfile

    script = f'echo $$ > "{group}/cgroup.procs" && exec "$0" -m edgepack.cli "$@"'
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(["sh", "-c", script, sys.executable, *argv], stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return proc.returncode, out.read(), err.read(), seconds, usage.ru_maxrss * 1024
