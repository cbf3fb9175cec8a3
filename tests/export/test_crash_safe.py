"""Crash-safe export: `edgepack pack` killed at any moment, or out of disk, leaves no bundle
that is not whole, and the next pack cleans up what the dead one left.

Kill trials: a pack is SIGKILLed at a random moment; then OUT must either not exist or be a
complete bundle that passes verify (the kill came after the final rename), and a re-run
must succeed and leave nothing but OUT. A pack is ~6 s in a fresh interpreter, ~5 s of
which are imports, and the part that writes files lasts ~0.2 s, so most trials run the
pack in a process forked from a forkserver that has imported torch and transformers: the
same `cli.main(["pack", ...])`, killed the same way, in ~0.7 s. Half of the kill times are
spread uniformly over a measured pack, half over its measured writing window (temp dir
appears -> OUT appears). A few trials kill a real `python -m edgepack.cli pack` process.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest

from edgepack.format import bundle
from edgepack.errors import BundleIntegrityError, DiskFullError, EdgepackError, ExportVerificationError, OutputExistsError

KILL_TRIALS = 20  # in forked processes, plus REAL_PROCESS_TRIALS below
REAL_PROCESS_TRIALS = 2
PRELOAD = ["torch", "transformers", "accelerate", "bitsandbytes", "edgepack.cli", "edgepack.export.pack",
           "edgepack.export.quantize", "edgepack.runtime", "transformers.models.llama.modeling_llama"]


def _pack_child(argv: list[str]) -> None:
    from edgepack import cli

    sys.exit(cli.main(argv))


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.glob(f".{out.name}.*"))


def _state(out: Path) -> str:
    """What a dead pack left at OUT: 'none', or 'bundle' (complete and verified)."""
    if not out.exists():
        return "none"
    manifest = bundle.verify_bundle(out, check_hashes=True)  # raises if OUT is not whole
    assert manifest.get("verification", {}).get("tensors_bit_identical") is True, "OUT lacks its verification record"
    return "bundle"


class Timeline:
    """Polls the output folder of a running pack: when the temp dir and OUT appear."""

    def __init__(self, out: Path):
        self.out, self.t0 = out, time.perf_counter()
        self.tmp_at = self.out_at = None

    def poll(self) -> None:
        now = time.perf_counter() - self.t0
        if self.tmp_at is None and any(self.out.parent.glob(f".{self.out.name}.tmp-*")):
            self.tmp_at = now
        if self.out_at is None and self.out.exists():
            self.out_at = now


@pytest.fixture(scope="module")
def forkserver():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def _run_forked(ctx, argv: list[str], timeout: float = 120) -> tuple[int, Timeline]:
    out = Path(argv[argv.index("-o") + 1])
    process = ctx.Process(target=_pack_child, args=(argv,))
    timeline = Timeline(out)
    process.start()
    while process.is_alive() and time.perf_counter() - timeline.t0 < timeout:
        timeline.poll()
        time.sleep(0.002)
    process.join(5)
    timeline.poll()
    return process.exitcode, timeline


def _kill_forked(ctx, argv: list[str], delay: float, after_temp_dir: bool) -> None:
    """SIGKILL a forked pack ``delay`` seconds after it starts, or after its temp dir appears."""
    out = Path(argv[argv.index("-o") + 1])
    process = ctx.Process(target=_pack_child, args=(argv,))
    timeline = Timeline(out)
    process.start()
    while after_temp_dir and timeline.tmp_at is None and process.is_alive():
        timeline.poll()
        time.sleep(0.001)
    time.sleep(delay)
    process.kill()
    process.join(10)


def _check_rerun_cleans_up(ctx, src: Path, out: Path) -> None:
    argv = ["pack", str(src), "-o", str(out), "-q", "--force"]
    exitcode, _ = _run_forked(ctx, argv)
    assert exitcode == 0
    assert _state(out) == "bundle"
    assert _leftovers(out) == [], "the re-run left temporary directories behind"


def test_pack_killed_at_random_moments_never_leaves_a_partial_bundle(tiny_models, tmp_path, forkserver):
    src, out, reference = tiny_models["llama"], tmp_path / "out", tmp_path / "reference"
    argv = ["pack", str(src), "-o", str(out), "-q", "--force"]
    _run_forked(forkserver, argv)  # starts the forkserver (imports), not measured
    out.rename(reference)
    exitcode, timeline = _run_forked(forkserver, argv)
    assert exitcode == 0 and timeline.tmp_at is not None and timeline.out_at is not None
    duration = time.perf_counter() - timeline.t0
    writing = timeline.out_at - timeline.tmp_at
    seed = int(os.environ.get("EDGEPACK_KILL_SEED", time.time_ns() % 10**6))
    rng = random.Random(seed)
    outcomes: dict[str, int] = {}
    for trial in range(KILL_TRIALS):
        shutil.rmtree(out, ignore_errors=True)
        if trial % 4 >= 2:  # replace an existing OUT (--force): killed before, during or after the swap
            shutil.copytree(reference, out)
        in_window = trial % 2 == 1
        _kill_forked(forkserver, argv, rng.uniform(0, writing + 0.02) if in_window else rng.uniform(0, duration), in_window)
        left = _leftovers(out)
        state = _state(out)  # OUT is absent or a whole, verified bundle: never a partial one
        key = f"{'write window' if in_window else 'any time'}: OUT {state}{', temp dirs left' if left else ''}"
        outcomes[key] = outcomes.get(key, 0) + 1
        if left or trial == KILL_TRIALS - 1:
            _check_rerun_cleans_up(forkserver, src, out)  # re-run succeeds, removes the dead one's temps
    print(f"\n{KILL_TRIALS} kill trials (seed {seed}), pack {duration:.2f}s, writing {writing:.2f}s: {outcomes}")
    assert sum(outcomes.values()) == KILL_TRIALS
    assert any("temp dirs left" in k for k in outcomes), f"no kill landed while the bundle was being written: {outcomes}"


def test_real_pack_process_killed_while_writing(tiny_models, tmp_path, forkserver):
    """`python -m edgepack.cli pack` killed with SIGKILL once its temp dir exists."""
    src, out = tiny_models["llama"], tmp_path / "out"
    rng = random.Random()
    for _ in range(REAL_PROCESS_TRIALS):
        shutil.rmtree(out, ignore_errors=True)
        proc = subprocess.Popen([sys.executable, "-m", "edgepack.cli", "pack", str(src), "-o", str(out), "-q"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        timeline = Timeline(out)
        while proc.poll() is None and timeline.tmp_at is None and time.perf_counter() - timeline.t0 < 120:
            timeline.poll()
            time.sleep(0.001)
        time.sleep(rng.uniform(0, 0.15))
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        _state(out)
        _check_rerun_cleans_up(forkserver, src, out)


# --- a full disk ---------------------------------------------------------------------------------


def _mount_tmpfs(path: Path, size_bytes: int) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)],
                          capture_output=True)
    return done.returncode == 0


def _umount(path: Path) -> None:
    subprocess.run(["umount", str(path)], capture_output=True)


def _failed_in(exc: BaseException) -> str:
    """The exporter step in which the disk filled up (from the suppressed original error)."""
    steps = ("_write_weights", "_write_model_files", "write_json_atomic", "_fsync_tree", "_verify_written")
    names = [frame.name for frame in traceback.extract_tb(exc.__context__.__traceback__)] if exc.__context__ else []
    return next((n for n in reversed(names) if n in steps), "other")


def test_full_disk_gives_a_clear_error_and_leaves_nothing(tiny_models, packed, tmp_path):
    from edgepack.export.pack import pack

    page = os.sysconf("SC_PAGE_SIZE")
    sizes = {e["path"]: e["size"] for e in bundle.read_manifest(packed("llama", 8))["files"]}
    shard_pages = math.ceil(sizes["model.safetensors"] / page)
    total_pages = sum(math.ceil(s / page) for s in sizes.values()) + 2 * 4  # + the manifest, written twice
    mount = tmp_path / "small"
    steps: dict[str, int] = {}
    for pages in range(shard_pages - 1, total_pages + 1, 2):
        if not _mount_tmpfs(mount, pages * page):
            pytest.skip("needs root and tmpfs to mount a small filesystem")
        try:
            try:
                pack(str(tiny_models["llama"]), mount / "out", bits=8)
                steps["succeeded"] = steps.get("succeeded", 0) + 1
                bundle.verify_bundle(mount / "out")
                continue
            except DiskFullError as exc:
                assert "is full; nothing was written" in exc.message and exc.hint
                step = _failed_in(exc)
                steps[step] = steps.get(step, 0) + 1
            assert os.listdir(mount) == [], f"{pages} pages: left {os.listdir(mount)}"
        finally:
            _umount(mount)
    print(f"\ndisk full at: {steps}")
    assert {"_write_weights", "_write_model_files", "write_json_atomic"} <= set(steps), steps


def test_full_disk_from_the_command_line(tiny_models, tmp_path, capsys):
    from edgepack import cli

    mount = tmp_path / "small"
    if not _mount_tmpfs(mount, 64 * 1024):
        pytest.skip("needs root and tmpfs to mount a small filesystem")
    try:
        rc = cli.main(["pack", str(tiny_models["llama"]), "-o", str(mount / "out"), "-q"])
        captured = capsys.readouterr()
        assert rc == 1 and captured.out == "" and "Traceback" not in captured.err
        errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
        assert errors == [f"error: the disk holding {mount} is full; nothing was written"], captured.err
        assert os.listdir(mount) == []
    finally:
        _umount(mount)


def test_disk_full_is_recognised_through_wrappers():
    from edgepack.export.pack import _is_disk_full

    assert _is_disk_full(OSError(28, "No space left on device"))
    wrapped = RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert _is_disk_full(wrapped)
    try:
        try:
            raise OSError(122, "Disk quota exceeded")
        except OSError:
            raise ValueError("save failed")  # noqa: B904 - the context is what is checked
    except ValueError as exc:
        assert _is_disk_full(exc)
    assert not _is_disk_full(EdgepackError("other"))


# --- folders that are not edgepack's --------------------------------------------------------------


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) under ``folder``."""
    return {p.relative_to(folder).as_posix(): None if p.is_dir() else p.read_bytes() for p in folder.rglob("*")}


def _pack_child_killed_while_verifying(argv: list[str]) -> None:
    """A pack that dies (SIGKILL) the moment it starts verifying what it wrote."""
    from edgepack import cli
    from edgepack.export import pack as exporter

    exporter._verify_written = lambda *_args: os.kill(os.getpid(), signal.SIGKILL)
    sys.exit(cli.main(argv))


def test_force_refuses_a_folder_that_is_not_a_bundle_and_deletes_nothing(tiny_models, tmp_path, capsys):
    from edgepack import cli

    plain = tmp_path / "nb"
    plain.mkdir()
    (plain / "important.txt").write_text("keep")
    fake = tmp_path / "victim"  # a file named edgepack.json does not make a folder a bundle
    (fake / "projects").mkdir(parents=True)
    (fake / "thesis.tex").write_text("x")
    (fake / "edgepack.json").write_text("{}")
    for out in (plain, fake):
        before = _snapshot(out)
        rc = cli.main(["pack", str(tiny_models["llama"]), "-o", str(out), "-q", "--force"])
        err = capsys.readouterr().err
        assert rc == 1 and "Traceback" not in err, err
        [error] = [line for line in err.splitlines() if line.startswith("error:")]
        assert "not an edgepack bundle" in error and "hint: choose an empty or new folder" in err, err
        assert _snapshot(out) == before and _leftovers(out) == []


def test_force_refuses_a_bundle_holding_anything_it_does_not_list(packed, tiny_models, tmp_path):
    from edgepack.export.pack import pack

    out = tmp_path / "b"
    shutil.copytree(packed("llama", 8), out)
    for extra in ("notes.md", "projects/"):
        (out / extra.rstrip("/")).mkdir() if extra.endswith("/") else (out / extra).write_text("mine")
        before = _snapshot(out)
        with pytest.raises(OutputExistsError, match=f"{extra} is not part of it"):
            pack(str(tiny_models["llama"]), out, bits=16, force=True)
        assert _snapshot(out) == before
        shutil.rmtree(out / extra) if extra.endswith("/") else (out / extra).unlink()


def test_force_keeps_the_old_bundle_until_the_new_one_is_verified(packed, tiny_models, tmp_path, monkeypatch):
    from edgepack.export import pack as exporter

    src, out = str(tiny_models["llama"]), tmp_path / "b"
    shutil.copytree(packed("llama", 16), out)
    before = _snapshot(out)

    def fail(*_args):
        raise ExportVerificationError("logits differ")

    monkeypatch.setattr(exporter, "_verify_written", fail)
    with pytest.raises(ExportVerificationError):
        exporter.pack(src, out, bits=8, force=True)
    assert _snapshot(out) == before and _leftovers(out) == []

    monkeypatch.undo()
    real = exporter._verify_written

    def sneak_a_file_in(*args):  # the user saves a file into OUT while the pack runs
        (out / "added.txt").write_text("mine")
        return real(*args)

    monkeypatch.setattr(exporter, "_verify_written", sneak_a_file_in)
    with pytest.raises(OutputExistsError, match="added.txt is not part of it"):
        exporter.pack(src, out, bits=8, force=True)
    assert (out / "added.txt").read_text() == "mine" and _leftovers(out) == []
    (out / "added.txt").unlink()
    assert _snapshot(out) == before
    monkeypatch.undo()
    exporter.pack(src, out, bits=8, force=True)
    assert bundle.verify_bundle(out)["quantization"]["bits"] == 8 and _leftovers(out) == []


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "rename-aside"])
def test_swap_replaces_a_bundle_and_leaves_nothing_behind(packed, tmp_path, monkeypatch, exchange):
    from edgepack.format import staging

    if not exchange:
        monkeypatch.setattr(staging, "_exchange", lambda a, b: False)
    out = tmp_path / "b"
    shutil.copytree(packed("llama", 16), out)
    tmp = staging.make_temp(out)
    assert (tmp / bundle.UNFINISHED_NAME).is_file() and tmp.name == f".b.tmp-{os.getpid()}"
    shutil.copytree(packed("llama", 8), tmp, dirs_exist_ok=True)
    staging.publish(tmp, out, hint="choose an empty or new folder")
    assert bundle.verify_bundle(out)["quantization"]["bits"] == 8 and _leftovers(out) == []


def test_pack_killed_while_verifying_leaves_a_temp_that_verify_refuses(tiny_models, tmp_path, forkserver, capsys):
    from edgepack import cli

    src, out = tiny_models["llama"], tmp_path / "out"
    dead = subprocess.Popen(["true"])
    dead.wait()
    yours = tmp_path / f".out.tmp-{dead.pid}"  # a user's folder that happens to look like a temporary
    yours.mkdir()
    (yours / "thesis.tex").write_text("mine")
    process = forkserver.Process(target=_pack_child_killed_while_verifying, args=(["pack", str(src), "-o", str(out), "-q"],))
    process.start()
    process.join(120)
    assert process.exitcode == -signal.SIGKILL
    [left] = [p for p in tmp_path.glob(".out.tmp-*") if p != yours]
    assert (left / bundle.MANIFEST_NAME).is_file()  # written before the verification it died in
    with pytest.raises(BundleIntegrityError, match="unfinished"):
        bundle.verify_bundle(left)
    assert cli.main(["verify", str(left)]) == 1
    err = capsys.readouterr().err
    assert "error:" in err and "unfinished" in err and "Traceback" not in err

    exitcode, _ = _run_forked(forkserver, ["pack", str(src), "-o", str(out), "-q"])
    assert exitcode == 0 and _state(out) == "bundle"
    assert not left.exists()  # the dead pack's temporary is gone
    assert (yours / "thesis.tex").read_text() == "mine"  # the look-alike is not edgepack's: kept
