"""`--dtype auto`: bf16 on CUDA and on CPUs with native bf16 (avx512_bf16, AMX), float32 elsewhere."""

from __future__ import annotations

import logging
import platform

import pytest
import torch

from server.model import precision
from server.model.precision import choose_dtype, cpuinfo_flags, native_cpu_bf16, resolve_dtype
from server.settings import Settings

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize(
    ("requested", "device", "features", "expected"),
    [
        ("auto", CPU, ["avx512_bf16"], torch.bfloat16),
        ("auto", CPU, ["amx"], torch.bfloat16),
        ("auto", CPU, [], torch.float32),
        ("auto", CUDA, [], torch.bfloat16),
        ("float32", CPU, ["avx512_bf16"], torch.float32),  # the exact mode is never overridden
        ("float32", CUDA, [], torch.float32),
        ("bfloat16", CPU, [], torch.bfloat16),
        ("float16", CPU, [], torch.float16),
    ],
)
def test_choose_dtype(requested, device, features, expected):
    choice = choose_dtype(requested, device, features)
    assert choice.dtype == expected
    assert choice.reason


def test_the_reason_names_the_feature_found():
    assert "avx512_bf16" in choose_dtype("auto", CPU, ["avx512_bf16"]).reason
    assert "no native bfloat16" in choose_dtype("auto", CPU, []).reason


def test_cpuinfo_flags_reads_the_first_flags_line(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: EPYC\nflags\t\t: fpu avx512f avx512_bf16\n\nflags\t: other\n")
    assert cpuinfo_flags(info) == {"fpu", "avx512f", "avx512_bf16"}
    assert cpuinfo_flags(tmp_path / "missing") == frozenset()  # no /proc (macOS, Windows)


def test_native_bf16_combines_torch_and_linux_flags(monkeypatch):
    monkeypatch.setattr(precision, "torch_native_bf16", lambda: [])
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    assert native_cpu_bf16(frozenset({"avx512f", "amx_bf16"})) == ["amx_bf16"]
    assert native_cpu_bf16(frozenset({"avx2", "avx512f"})) == []
    monkeypatch.setattr(platform, "machine", lambda: "arm64")  # x86 flag names mean nothing elsewhere
    assert native_cpu_bf16(frozenset({"avx512_bf16"})) == []
    monkeypatch.setattr(precision, "torch_native_bf16", lambda: ["avx512_bf16"])
    assert native_cpu_bf16(frozenset()) == ["avx512_bf16"]


def test_torch_probe_tolerates_a_torch_without_it(monkeypatch):
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    assert precision.torch_native_bf16() == []


def test_this_machine_agrees_with_its_cpuinfo():
    """Where Linux lists avx512_bf16 or amx_bf16, auto picks bf16 on CPU; where it lists neither, torch decides."""
    listed = [flag for flag in precision.NATIVE_BF16_FLAGS if flag in cpuinfo_flags()]
    expected = torch.bfloat16 if listed or precision.torch_native_bf16() else torch.float32
    assert choose_dtype("auto", CPU).dtype == expected


def test_the_choice_is_logged(caplog):
    with caplog.at_level(logging.INFO, logger="server.model.precision"):
        assert resolve_dtype("float32", CPU) == torch.float32
    assert "serving dtype float32 (--dtype float32)" in caplog.text


def test_settings_default_is_auto_and_the_suite_pins_float32(monkeypatch):
    assert Settings.model_fields["dtype"].default == "auto"
    assert Settings().dtype == "float32"  # tests/conftest.py: the suite runs in the exact mode
    monkeypatch.delenv("LORAPLEX_DTYPE")
    assert Settings().dtype == "auto"
