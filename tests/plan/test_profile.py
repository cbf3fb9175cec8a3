"""Device profiles: the built-in files, validation, probing this machine, and the CLI glue."""

from __future__ import annotations

import copy
import json
import shutil

import psutil
import pytest

from edgepack.plan import probe as probing, profile as prof
from edgepack.cli import main
from edgepack.errors import ProfileError
from edgepack.plan.probe import probe
from edgepack.plan.profile import DeviceProfile, list_profiles, load_profile, profiles_dir

GIB = 1 << 30
MIB = 1 << 20
REQUIRED = {
    "rpi4-4gb", "rpi5-4gb", "rpi5-8gb", "rpi5-16gb", "jetson-orin-nano-8gb", "jetson-agx-orin-32gb",
    "t4", "l4", "a10g", "rtx3060-12gb", "rtx4060-8gb", "gtx1650-4gb", "cpu-laptop-8gb", "cpu-laptop-16gb",
}


@pytest.fixture(scope="module")
def probed() -> dict:
    # The bitsandbytes check runs in a subprocess and takes a few seconds: probe once.
    return probe()


def valid_dict() -> dict:
    return copy.deepcopy(load_profile("t4").to_dict())


def problems_of(d: dict) -> str:
    with pytest.raises(ProfileError) as info:
        DeviceProfile.from_dict(d, origin="bad.json")
    return info.value.message


# --- built-in profiles ------------------------------------------------------------------------


def test_every_builtin_profile_loads_and_names_match_files():
    profiles = list_profiles()
    assert len(profiles) >= 12
    names = [p.name for p in profiles]
    assert names == sorted(names)
    assert REQUIRED <= set(names)
    assert names == sorted(f.stem for f in profiles_dir().glob("*.json"))


@pytest.mark.parametrize("path", sorted(profiles_dir().glob("*.json")), ids=lambda p: p.stem)
def test_builtin_file_is_exactly_what_to_dict_writes(path):
    on_disk = json.loads(path.read_text())
    p = load_profile(path.stem)
    assert p.to_dict() == on_disk  # no field is dropped or defaulted on load
    assert DeviceProfile.from_dict(p.to_dict()) == p
    assert 0 < p.ram_usable_bytes < p.ram_bytes
    assert p.probed is None and p.disk_free_bytes is None
    assert p.source.strip() and p.reserved_note.strip()
    for i, g in enumerate(p.gpus):
        assert 0 < p.gpu_usable_bytes(i) < g.memory_bytes
        assert g.bf16 == (float(g.compute_capability) >= 8.0)


def test_unified_profiles_count_memory_once():
    unified = [p for p in list_profiles() if p.unified_memory]
    assert {p.name for p in unified} >= {"jetson-orin-nano-8gb", "jetson-agx-orin-32gb"}
    for p in unified:
        assert len(p.gpus) == 1
        assert p.gpus[0].memory_bytes == p.ram_bytes
        assert p.gpus[0].reserved_bytes >= p.ram_reserved_bytes  # the OS lives in the same pool


def test_published_figures():
    t4, nano = load_profile("t4"), load_profile("jetson-orin-nano-8gb")
    assert t4.gpus[0].memory_bytes == 15360 * MIB and t4.gpus[0].compute_capability == "7.5"
    assert not t4.gpus[0].bf16 and t4.ram_bytes == 16 * GIB
    assert nano.gpus[0].compute_capability == "8.7" and nano.ram_bytes == 8 * GIB
    assert load_profile("rpi5-8gb").ram_usable_bytes == 8 * GIB - 512 * MIB
    assert not load_profile("cpu-laptop-8gb").has_gpu
    assert load_profile("l4").gpus[0].compute_capability == "8.9"
    assert load_profile("a10g").gpus[0].compute_capability == "8.6"


# --- loading ----------------------------------------------------------------------------------


def test_load_by_name_and_by_path_agree(tmp_path):
    copied = tmp_path / "my-box.json"
    shutil.copy(profiles_dir() / "rpi5-8gb.json", copied)
    by_name, by_path = load_profile("rpi5-8gb"), load_profile(str(copied))
    assert by_name == by_path
    assert by_path.origin == str(copied)


def test_unknown_name_suggests_close_matches():
    with pytest.raises(ProfileError) as info:
        load_profile("rpi5-8g")
    assert "rpi5-8g" in info.value.message
    assert "rpi5-8gb" in info.value.hint and "edgepack profiles" in info.value.hint
    with pytest.raises(ProfileError) as info:
        load_profile("jetson")
    assert "jetson-orin-nano-8gb" in info.value.hint


def test_missing_file_of_a_builtin_name_hints_the_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ProfileError) as info:
        load_profile("t4.json")
    assert "does not exist" in info.value.message and "t4" in info.value.hint


def test_not_json_is_one_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{ram_bytes: 8GB")
    with pytest.raises(ProfileError) as info:
        load_profile(str(bad))
    assert "not valid JSON" in info.value.message and "line 1" in info.value.message
    assert "\n" not in info.value.message
    bad.write_text("[1, 2]")
    with pytest.raises(ProfileError, match="must be a JSON object"):
        load_profile(str(bad))


def test_every_problem_is_listed_at_once():
    d = valid_dict()
    del d["description"]
    d["ram_bytes"] = -1
    d["swap_bytes"] = "2 GiB"
    d["unified_memory"] = "no"
    d["cpu"]["cores"] = True  # a JSON bool is not a count
    del d["gpus"][0]["memory_bytes"]
    d["gpus"][0]["compute_capability"] = 8.6
    d["bitsandbytes"]["cuda"] = "yes"
    d["ram_byte"] = 1  # a typo
    message = problems_of(d)
    assert message.startswith("profile bad.json: ")
    for expected in ("description missing", "ram_bytes must be a positive integer, got -1",
                     "swap_bytes must be a non-negative integer", "unified_memory must be true or false",
                     "cpu.cores must be a positive integer", "gpus[0].memory_bytes missing",
                     "gpus[0].compute_capability must be a string like '8.6'",
                     "bitsandbytes.cuda must be true, false or null", "ram_byte: unknown key"):
        assert expected in message, expected
    assert "\n" not in message


def test_wrong_schema_and_bad_name():
    d = valid_dict()
    d["schema"] = "edgepack-profile/2"
    d["name"] = "My Box"
    message = problems_of(d)
    assert "schema must be 'edgepack-profile/1'" in message and "name must be" in message


def test_cross_field_checks():
    d = valid_dict()
    d["ram_reserved_bytes"] = d["ram_bytes"]
    d["gpus"][0]["reserved_bytes"] = d["gpus"][0]["memory_bytes"] + 1
    message = problems_of(d)
    assert "ram_reserved_bytes" in message and "gpus[0].reserved_bytes" in message

    d = valid_dict()
    d["gpus"] = []
    assert "bitsandbytes.cuda is true but gpus is empty" in problems_of(d)

    d = copy.deepcopy(load_profile("jetson-orin-nano-8gb").to_dict())
    d["gpus"][0]["memory_bytes"] = 4 * GIB
    d["gpus"][0]["reserved_bytes"] = 1 * GIB  # below the OS's share of the same pool
    message = problems_of(d)
    assert "must equal ram_bytes" in message and "at least ram_reserved_bytes" in message


def test_builtin_name_must_match_file_stem(tmp_path, monkeypatch):
    d = valid_dict()
    (tmp_path / "other.json").write_text(json.dumps(d))
    monkeypatch.setenv("EDGEPACK_PROFILES_DIR", str(tmp_path))
    assert profiles_dir() == tmp_path
    with pytest.raises(ProfileError, match="name is 't4' but the file is other.json"):
        load_profile("other")
    with pytest.raises(ProfileError, match="other.json"):
        list_profiles()


def test_parse_cpuinfo_raspberry_pi_5():
    text = ("processor\t: 0\nBogoMIPS\t: 108.00\n"
            "Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid "
            "asimdrdm lrcpc dcpop asimddp\nCPU implementer\t: 0x41\nCPU part\t: 0xd0b\n"
            "Model\t\t: Raspberry Pi 5 Model B Rev 1.0\n")
    model, simd = probing._parse_cpuinfo(text, "aarch64")
    assert model == "Cortex-A76 (Raspberry Pi 5 Model B Rev 1.0)"
    assert simd == ["neon", "asimd", "dotprod"]


def test_parse_cpuinfo_x86():
    text = "model name\t: Intel(R) Core(TM) i5-1235U\nmodel\t\t: 154\nflags\t\t: fpu sse2 avx avx2 fma f16c\n"
    assert probing._parse_cpuinfo(text, "x86_64") == ("Intel(R) Core(TM) i5-1235U", ["avx", "avx2", "f16c", "fma"])


# --- probing ----------------------------------------------------------------------------------


def test_probe_round_trips_through_a_file(probed, tmp_path):
    assert probed["schema"] == prof.PROFILE_SCHEMA
    assert probed["ram_bytes"] == psutil.virtual_memory().total
    assert 0 <= probed["ram_reserved_bytes"] < probed["ram_bytes"]
    assert probed["name"].startswith("probed-")
    assert probed["probed"]["host"] and probed["probed"]["at"]
    assert isinstance(probed["bitsandbytes"]["cpu"], bool)
    path = tmp_path / "me.json"
    path.write_text(json.dumps(probed))
    loaded = load_profile(str(path))
    assert loaded.to_dict() == probed
    assert loaded.ram_usable_bytes == probed["probed"]["available_ram_bytes"]


def test_probe_records_bitsandbytes_failure(monkeypatch):
    monkeypatch.setattr(probing, "_BNB_CHECK", "import sys; sys.exit('ImportError: no bnb here')")
    ok_cpu, ok_cuda, error = probing._bitsandbytes_works(False, timeout_s=30)
    assert (ok_cpu, ok_cuda) == (False, None)
    assert "ImportError: no bnb here" in error


def test_probe_rejects_a_bad_name():
    with pytest.raises(ProfileError, match="lowercase"):
        probe(name="My Box", check_bitsandbytes=False)


# --- CLI ------------------------------------------------------------------------------------------


def test_cli_profile_writes_a_loadable_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(probing, "_bitsandbytes_works", lambda with_cuda, timeout_s: (True, None, None))
    out = tmp_path / "box.json"
    assert main(["profile", "--out", str(out), "--name", "my-box"]) == 0
    p = load_profile(str(out))
    assert p.name == "my-box" and p.ram_bytes == psutil.virtual_memory().total
    assert [f.name for f in tmp_path.iterdir()] == ["box.json"]  # no temp file left behind
    captured = capsys.readouterr()
    assert captured.out == "" and f"wrote {out}" in captured.err


def test_cli_profile_to_stdout(monkeypatch, capsys):
    monkeypatch.setattr(probing, "_bitsandbytes_works", lambda with_cuda, timeout_s: (True, None, None))
    assert main(["profile"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert DeviceProfile.from_dict(d).ram_bytes == psutil.virtual_memory().total


@pytest.mark.parametrize("where", ["missing-dir/p.json", "a-file/p.json", "."])
def test_cli_profile_unwritable_path(tmp_path, capsys, where):
    (tmp_path / "a-file").write_text("x")
    assert main(["profile", "--out", str(tmp_path / where)]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cannot write profile" in errors[0]


def test_save_profile_failure_is_a_profile_error(tmp_path):
    with pytest.raises(ProfileError, match="cannot write profile"):
        prof.save_profile(load_profile("t4"), tmp_path / "missing" / "t4.json")


def test_cli_profiles_lists_every_name(capsys):
    assert main(["profiles"]) == 0
    out = capsys.readouterr().out
    for p in list_profiles():
        assert p.name in out
    assert "RAM USABLE" in out and "7.5 GiB" in out  # rpi5-8gb


def test_cli_profiles_json(capsys):
    assert main(["profiles", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [d["name"] for d in listed] == [p.name for p in list_profiles()]


def test_library_code_never_prints(capsys):
    with pytest.raises(ProfileError):
        load_profile("nope")
    assert capsys.readouterr().out == ""  # library code never prints
