import dataclasses

import pytest

from edgekit.errors import TargetError
from edgekit.targets import all_targets, builtin_names, load_target, parse_profile

REQUIRED = {"rpi4", "rpi5", "rpi-zero2", "jetson-orin", "jetson-nano", "x86-avx2", "x86-avx512-vnni"}


def test_every_required_profile_ships_and_validates():
    assert REQUIRED <= set(builtin_names())
    for p in all_targets():
        assert p.formats and p.runtime.threads >= 1
        assert p.reasons, f"{p.name} gives no reason for its choices"
        assert all(r.strip() for r in p.reasons.values())


def test_hardware_facts_drive_the_choices():
    avx2, vnni, orin = load_target("x86-avx2"), load_target("x86-avx512-vnni"), load_target("jetson-orin")
    assert (avx2.onnx.activation_type, avx2.onnx.weight_type, avx2.onnx.reduce_range) == ("uint8", "int8", True)
    assert vnni.onnx.reduce_range is False and "avx512_vnni" in vnni.device.cpu_features
    assert orin.onnx.symmetric_activations and orin.onnx.activation_type == "int8"
    assert orin.onnx.quant_format == "qdq" and orin.onnx.fp16_allowed
    assert orin.runtime.execution_providers[0] == "TensorrtExecutionProvider"
    assert "tflite" == load_target("rpi4").formats[0]
    nano = load_target("jetson-nano")
    assert any("INT8" in lim for lim in nano.device.limitations)
    assert load_target("rpi-zero2").device.memory_mb == 512


def test_profiles_are_frozen():
    p = load_target("rpi4")
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.runtime.threads = 1


BASE = """
name = "board"
description = "a test board"
[device]
arch = "aarch64"
cpu = "Cortex-A55"
cores = 4
memory_mb = 2048
[build]
formats = ["tflite"]
[runtime]
threads = 2
"""


def test_user_profile_by_path(tmp_path):
    f = tmp_path / "board.toml"
    f.write_text(BASE)
    p = load_target(str(f))
    assert p.name == "board" and p.tflite.io_type == "int8" and p.onnx.opset == 17


@pytest.mark.parametrize("patch, key, words", [
    ("[device]\nbogus = 1", "device.bogus", "unknown key"),
    ('[tflite]\nio_type = "int4"', "tflite.io_type", "not one of"),
    ('[onnx]\nopset = "17"', "onnx.opset", "expected a integer"),
    ('[onnx]\nper_channel = "yes"', "onnx.per_channel", "expected a boolean"),
    ('[onnx]\ncolour_why = "x"', "onnx.colour_why", "reason given for unknown key"),
])
def test_bad_profile_names_file_and_key(tmp_path, patch, key, words):
    f = tmp_path / "bad.toml"
    section = patch.split("\n")[0]
    text = BASE.replace(section, patch) if section in BASE else BASE + "\n" + patch
    f.write_text(text)
    with pytest.raises(TargetError) as e:
        load_target(str(f))
    assert str(f) in str(e.value) and key in str(e.value) and words in str(e.value)


def test_missing_key_and_impossible_combination(tmp_path):
    with pytest.raises(TargetError, match="device.cores.*required"):
        parse_profile(BASE.replace("cores = 4\n", ""), "x.toml")
    with pytest.raises(TargetError, match="symmetric_activations"):
        parse_profile(BASE + '[onnx]\nsymmetric_activations = true\nactivation_type = "uint8"\n', "x.toml")


def test_llm_kv_cache_type_follows_the_build():
    """The KV cache's type is the model builder's I/O type: float32 on the CPU and at fp32, float16 for CUDA at
    int4 / int8 / fp16. A profile saying otherwise is refused (its kv_bytes_per_token would be off by 2x); one
    that does not say gets the build's."""
    cuda = BASE + '[llm]\nexecution_provider = "cuda"\n'
    with pytest.raises(TargetError) as e:
        parse_profile(cuda + 'kv_cache_type = "float32"\n', "gpu.toml")
    assert "gpu.toml" in str(e.value) and "llm.kv_cache_type" in str(e.value) and "float16" in str(e.value)
    assert parse_profile(cuda, "gpu.toml").llm.kv_cache_type == "float16"
    assert parse_profile(cuda + 'precision = "fp32"\nkv_cache_type = "float32"\n', "gpu.toml").llm.kv_cache_type \
        == "float32"
    with pytest.raises(TargetError, match="llm.kv_cache_type"):
        parse_profile(BASE + '[llm]\nkv_cache_type = "float16"\n', "cpu.toml")
    assert parse_profile(BASE, "cpu.toml").llm.kv_cache_type == "float32"
    nano = load_target("jetson-nano").llm
    assert (nano.kv_cache_type, nano.kv_type("int8"), nano.kv_type("fp32")) == ("float16", "float16", "float32")


def test_unknown_target_lists_the_valid_ones():
    with pytest.raises(TargetError) as e:
        load_target("rpi9")
    for name in REQUIRED:
        assert name in str(e.value)


def test_cli_targets_list_and_show(cli):
    r = cli("targets", "list")
    assert r.exit_code == 0
    lines = r.stdout.strip().splitlines()[2:]
    assert {ln.split()[0] for ln in lines} == set(builtin_names())
    r = cli("targets", "show", "rpi4")
    assert r.exit_code == 0 and "why:" in r.stdout and "Cortex-A72" in r.stdout
    r = cli("targets", "show", "nope")
    assert r.exit_code == 2 and "unknown target 'nope'" in r.stderr and "rpi4" in r.stderr


def test_cli_targets_show_prints_the_llm_section_with_its_reasons(cli):
    """docs/llm.md sends users to `targets show` for each language-model choice and its why."""
    p = load_target("rpi5")
    out = cli("targets", "show", "rpi5").stdout
    llm = out.split("\n[llm]\n", 1)[1]
    assert f"  block_size             {p.llm.block_size}" in llm and f"      why: {p.reason('llm.algo')}" in llm
    assert f"  context_max            {p.llm.context_max}" in llm
