"""``edgepack profile`` (probe this machine, write its profile) and ``edgepack profiles``
(list the built-in ones): the only profile code that prints."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from edgepack.errors import ProfileError
from edgepack.plan.profile import GIB, DeviceProfile, list_profiles, save_profile


def configure_profile_parser(p) -> None:
    p.add_argument("--out", metavar="FILE", help="write the profile JSON here (default: stdout)")
    p.add_argument("--name", metavar="NAME", help="profile name (default: probed-<hostname>)")


def main_profile(args) -> int:
    from edgepack.plan.probe import probe

    out = Path(args.out) if args.out else None
    if out is not None:  # fail before the slow probe, not after it
        _check_writable(out)
    profile = DeviceProfile.from_dict(probe(name=args.name), origin="probe")
    if out is None:
        sys.stdout.write(json.dumps(profile.to_dict(), indent=2) + "\n")
    else:
        save_profile(profile, out)
    print(_summary(profile, out), file=sys.stderr)
    return 0


def configure_profiles_parser(p) -> None:
    p.add_argument("--json", action="store_true", help="print the profiles as a JSON list")


def main_profiles(args) -> int:
    profiles = list_profiles()
    if args.json:
        sys.stdout.write(json.dumps([p.to_dict() for p in profiles], indent=2) + "\n")
        return 0
    rows = [("NAME", "RAM USABLE", "GPU USABLE", "UNIFIED", "READ GB/S", "DESCRIPTION")]
    for p in profiles:
        gpu = " + ".join(_gib(g.usable_bytes) for g in p.gpus) or "-"
        rows.append((p.name, _gib(p.ram_usable_bytes), gpu, "yes" if p.unified_memory else "no", _bandwidth(p),
                     p.description))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:5], widths)) + "  " + r[5])
    print("\nusable = physical minus what the OS, driver and CUDA context keep (each file's reserved_note);"
          "\nunified: RAM and GPU are one pool, count it once; read GB/s: RAM (+ GPU), what a decode step"
          "\nstreams its weights at (memory_bandwidth.basis: measured, estimated or theoretical; .source says how).")
    return 0


def _check_writable(out: Path) -> None:
    parent = out.parent
    if out.is_dir():
        raise ProfileError(f"cannot write profile {out}: it is a directory", "give --out a file name")
    if not parent.is_dir():
        what = "is not a directory" if parent.exists() else "does not exist"
        raise ProfileError(f"cannot write profile {out}: {parent} {what}",
                           "create the directory first, or pick another --out")
    if not os.access(parent, os.W_OK):
        raise ProfileError(f"cannot write profile {out}: directory {parent} is not writable",
                           "pick another --out")


def _bandwidth(p: DeviceProfile) -> str:
    """RAM read GB/s (+ each GPU's), "?" where the profile has no figure."""
    def gb(bw) -> str:
        return f"{bw.read_bytes_per_s / 1e9:.1f}" if bw else "?"

    return " + ".join([gb(p.memory_bandwidth)] + [gb(g.memory_bandwidth) for g in p.gpus])


def _gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


def _summary(p: DeviceProfile, out: Path | None) -> str:
    gpus = ", ".join(f"{g.name} {_gib(g.usable_bytes)} free" for g in p.gpus) or "no CUDA GPU"
    bnb = {True: "ok", False: "fails", None: "unknown"}
    cuda = bnb[p.bitsandbytes.cuda] if p.gpus else "n/a"
    lines = [f"{'wrote ' + str(out) if out else 'profile'} {p.name}: {p.cpu.model}, {p.cpu.cores} CPUs, "
             f"RAM {_gib(p.ram_bytes)} ({_gib(p.ram_usable_bytes)} available), {gpus}",
             f"bitsandbytes: cpu {bnb[p.bitsandbytes.cpu]}, cuda {cuda}"]
    if p.memory_bandwidth:
        lines.append(f"memory read: {p.memory_bandwidth.read_bytes_per_s / 1e9:.1f} GB/s ({p.memory_bandwidth.source})")
    if p.probed and p.probed.bitsandbytes_error:
        lines.append(f"bitsandbytes error: {p.probed.bitsandbytes_error}")
    return "\n".join(lines)
