"""Precision choice: ``auto`` from the CPU flags (faked /proc/cpuinfo) or the GPU's compute capability."""

from __future__ import annotations

import pytest
import torch

from usfmae_hf import precision
from usfmae_hf.commands.features import PRECISIONS as COMMAND_PRECISIONS
from usfmae_hf.errors import UsfmaeError
from usfmae_hf.precision import PRECISIONS, choose_precision, cpu_flags, describe_precision, resolve_dtype

# Two processors, as /proc/cpuinfo lists them; only the flags lines matter.
CPUINFO = """processor\t: {index}
vendor_id\t: GenuineIntel
model name\t: a CPU
flags\t\t: fpu sse2 avx avx2 {extra}
bugs\t\t: spectre_v1

"""


@pytest.fixture
def fake_cpu(tmp_path, monkeypatch):
    """Point the probe at a written /proc/cpuinfo whose processors have the given extra flags."""

    def make(extra: str) -> None:
        path = tmp_path / "cpuinfo"
        path.write_text("".join(CPUINFO.format(index=i, extra=extra) for i in range(2)))
        monkeypatch.setattr(precision, "CPUINFO", path)

    return make


@pytest.mark.parametrize(
    "extra, name, reason",
    [
        ("avx512f amx_bf16 amx_tile amx_int8", "bf16", "CPU has AMX"),
        ("amx_tile", "bf16", "CPU has AMX"),
        ("avx512f avx512_bf16", "bf16", "CPU has AVX-512 BF16"),
        ("avx512f avx512bw", "fp32", "CPU has no AMX or AVX-512 BF16"),
        ("", "fp32", "CPU has no AMX or AVX-512 BF16"),
    ],
)
def test_auto_follows_the_cpu_flags(fake_cpu, extra, name, reason):
    fake_cpu(extra)
    chosen = choose_precision("auto", "cpu")
    assert (chosen.name, chosen.reason) == (name, reason)
    assert chosen.dtype == {"bf16": torch.bfloat16, "fp32": torch.float32}[name]
    assert resolve_dtype("auto") == chosen.dtype
    assert describe_precision("auto", None) == f"{name} ({reason})"


def test_flags_are_parsed_from_every_processor(fake_cpu):
    fake_cpu("amx_tile")
    flags = cpu_flags()
    assert {"avx2", "amx_tile", "fpu"} <= flags and "spectre_v1" not in flags and "GenuineIntel" not in flags


def test_without_cpuinfo_torch_cpuid_queries_decide(tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "CPUINFO", tmp_path / "missing")
    assert cpu_flags() is None
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    assert resolve_dtype("auto", "cpu") == torch.float32
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert describe_precision("auto", "cpu") == "bf16 (CPU has AVX-512 BF16)"


def test_explicit_choices_and_refusals(fake_cpu):
    fake_cpu("amx_tile")
    assert describe_precision("fp32") == "fp32 (requested)"
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16
    assert choose_precision(torch.bfloat16).name == "bf16"
    with pytest.raises(UsfmaeError, match="fp16 is not supported on CPU") as refused:
        choose_precision("fp16", "cpu")
    assert "\n" not in str(refused.value)
    with pytest.raises(UsfmaeError, match="fp16"):
        choose_precision(torch.float16)
    with pytest.raises(ValueError, match="precision must be one of"):
        choose_precision("float32")
    with pytest.raises(ValueError, match="dtype must be one of"):
        choose_precision(torch.float64)


@pytest.mark.parametrize("capability, name", [((9, 0), "bf16"), ((8, 0), "bf16"), ((7, 5), "fp32")])
def test_auto_on_cuda_follows_the_compute_capability(monkeypatch, capability, name):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    chosen = choose_precision("auto", "cuda")
    assert chosen.name == name
    assert ("compute capability" in chosen.reason) == (name == "bf16")
    assert choose_precision("fp16", "cuda:0").dtype == torch.float16  # fp16 is fine on a GPU


def test_auto_elsewhere_is_fp32(monkeypatch):
    assert choose_precision("auto", "mps").name == "fp32"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert str(choose_precision("auto", "cuda")) == "fp32 (no fast bf16 on cuda)"


def test_the_cli_offers_the_same_names():
    assert COMMAND_PRECISIONS == PRECISIONS


def test_cpu_name_reads_the_model_name_line(tmp_path):
    from usfmae_hf.precision import cpu_name

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Example CPU 9000\nflags\t\t: avx2\n")
    assert cpu_name(cpuinfo) == "Example CPU 9000"
    assert cpu_name(tmp_path / "missing")  # falls back to the platform's string, never empty


def test_cpu_vendor_reads_the_vendor_id_line(tmp_path):
    from usfmae_hf.precision import cpu_vendor

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: avx2\n")
    assert cpu_vendor(cpuinfo) == "AuthenticAMD"
    assert cpu_vendor(tmp_path / "missing") is None


def test_cpu_features_name_the_vector_and_matrix_units(fake_cpu, tmp_path):
    from usfmae_hf.precision import cpu_features

    fake_cpu("avx512f avx512_bf16 amx_bf16 amx_tile")
    assert cpu_features() == ["AVX2", "AVX-512", "AVX-512 BF16", "AMX"]
    fake_cpu("")  # an AVX2-only machine such as the AMD EPYC ones
    assert cpu_features() == ["AVX2"]
    assert cpu_features(tmp_path / "missing") == []
