"""Pure logic of deploy, no device and no TensorFlow (seconds): the device-side release switch,
bundle choice per device, inventory selection, rollout plans, the protocol's argv and replies."""

import json
import os
from pathlib import Path

import pytest

from edgekit.bundle import Bundle, sha256_tree
from edgekit.deploy import protocol
from edgekit.deploy.artifact import Artifact, tree_digest
from edgekit.deploy.inventory import Device, load_inventory
from edgekit.deploy.ops import choose_bundle
from edgekit.deploy.rollout import Plan, RolloutError, Share, batch_failed, exceeds
from edgekit.errors import BundleError, DeviceError, InventoryError
from edgekit.runtime import releases


# --- releases.activate / rollback / revert / keep (the device side) -------------------------

def _release_dir(tmp: Path, tag: str, good: bool = True) -> tuple:
    """An uploaded release directory; a 'bad' one fails its health check (no loadable model)."""
    src = tmp / f"src-{tag}"
    src.mkdir()
    (src / "note.txt").write_text(tag)
    if not good:
        (src / "manifest.json").write_text("{not json")
    return src, sha256_tree(src)


def _upload(root: Path, name: str, src: Path, sha: str) -> str:
    incoming = f".incoming-{sha[:12]}-{os.urandom(4).hex()}"
    dst = root / "models" / name / incoming
    dst.parent.mkdir(parents=True, exist_ok=True)
    import shutil

    shutil.copytree(src, dst)
    return incoming


def _current(root: Path, name: str = "m"):
    link = root / "models" / name / "current"
    return os.readlink(link).split("/")[-1] if link.is_symlink() else None


def test_activate_switches_and_keeps_history(tmp_path):
    root = tmp_path / "root"
    a, sha_a = _release_dir(tmp_path, "a")
    b, sha_b = _release_dir(tmp_path, "b")
    r = releases.activate(str(root), "m", sha_a, incoming=_upload(root, "m", a, sha_a), check=False)
    assert r["status"] == "deployed" and r["previous"] is None and _current(root) == sha_a
    r = releases.activate(str(root), "m", sha_b, incoming=_upload(root, "m", b, sha_b), check=False)
    assert r["status"] == "deployed" and r["previous"] == sha_a and _current(root) == sha_b
    assert releases.activate(str(root), "m", sha_b, check=False)["status"] == "unchanged"
    assert releases._history(root / "models" / "m") == [sha_a, sha_b]
    assert not list((root / "models" / "m").glob(".incoming-*"))
    r = releases.rollback(str(root), "m", check=False)
    assert r["current"] == sha_a and _current(root) == sha_a


def test_activate_rejects_a_corrupted_upload(tmp_path):
    root = tmp_path / "root"
    a, sha_a = _release_dir(tmp_path, "a")
    inc = _upload(root, "m", a, sha_a)
    (root / "models" / "m" / inc / "note.txt").write_text("tampered")
    with pytest.raises(BundleError, match="upload verification failed"):
        releases.activate(str(root), "m", sha_a, incoming=inc, check=False)
    assert _current(root) is None and not (root / "models" / "m" / inc).exists()


def test_failed_health_check_rolls_back_to_previous(tmp_path):
    root = tmp_path / "root"
    a, sha_a = _release_dir(tmp_path, "a")
    bad, sha_bad = _release_dir(tmp_path, "bad", good=False)
    releases.activate(str(root), "m", sha_a, incoming=_upload(root, "m", a, sha_a), check=False)
    r = releases.activate(str(root), "m", sha_bad, incoming=_upload(root, "m", bad, sha_bad), check=True)
    assert r["status"] == "rolled-back" and not r["health"]["ok"] and r["health"]["error"]
    assert r["current"] == sha_a and _current(root) == sha_a
    # a first deploy that fails leaves no current at all
    root2 = tmp_path / "root2"
    r = releases.activate(str(root2), "m", sha_bad, incoming=_upload(root2, "m", bad, sha_bad), check=True)
    assert r["status"] == "rolled-back" and _current(root2) is None


def test_keep_prunes_old_releases_but_never_current(tmp_path):
    root = tmp_path / "root"
    shas = []
    for i in range(4):
        d, sha = _release_dir(tmp_path, f"r{i}")
        releases.activate(str(root), "m", sha, incoming=_upload(root, "m", d, sha), keep=2, check=False)
        os.utime(root / "models" / "m" / "releases" / sha, (1000 + i, 1000 + i))
        shas.append(sha)
    left = {p.name for p in (root / "models" / "m" / "releases").iterdir()}
    assert left == set(shas[-2:]) and _current(root) == shas[-1]


def test_revert_is_a_compare_and_set(tmp_path):
    root = tmp_path / "root"
    a, sha_a = _release_dir(tmp_path, "a")
    b, sha_b = _release_dir(tmp_path, "b")
    releases.activate(str(root), "m", sha_a, incoming=_upload(root, "m", a, sha_a), check=False)
    releases.activate(str(root), "m", sha_b, incoming=_upload(root, "m", b, sha_b), check=False)
    assert releases.revert(str(root), "m", sha_a, sha_a)["status"] == "not-current"  # current is b: untouched
    assert _current(root) == sha_b
    r = releases.revert(str(root), "m", sha_b, sha_a)
    assert r["status"] == "reverted" and _current(root) == sha_a
    assert releases.revert(str(root), "m", sha_b, sha_a)["status"] == "not-current"  # idempotent
    r = releases.revert(str(root), "m", sha_a, None)                                # back to no release
    assert r["status"] == "reverted" and _current(root) is None


# --- bundle choice per device -------------------------------------------------------------

def _art(target, fmt, formats):
    m = {"name": "digits", "target": {"name": target, "formats": formats}, "model": {"format": fmt}}
    return Artifact(Bundle(Path(f"/b/digits-{target}-{fmt}"), m), f"{target}-{fmt}", ())


def test_bundle_choice_follows_profile_order_and_backends():
    arts = [_art("rpi4", "onnx", ["tflite", "onnx"]), _art("rpi4", "tflite", ["tflite", "onnx"]),
            _art("x86-avx2", "onnx", ["onnx", "tflite"]), _art("x86-avx2", "tflite", ["onnx", "tflite"])]
    pi = Device("pi", "h", target="rpi4")
    x86 = Device("box", "h", target="x86-avx2")
    assert choose_bundle(pi, arts, ["tflite", "onnx"]).sha256 == "rpi4-tflite"
    assert choose_bundle(pi, arts, ["onnx"]).sha256 == "rpi4-onnx"
    assert choose_bundle(x86, arts, None).sha256 == "x86-avx2-onnx"
    assert choose_bundle(x86, arts, ["tflite"]).sha256 == "x86-avx2-tflite"
    with pytest.raises(DeviceError, match="no backend on the device runs onnx or tflite"):
        choose_bundle(x86, arts, [])
    with pytest.raises(DeviceError, match="none of the bundles is built for its target jetson-orin"):
        choose_bundle(Device("j", "h", target="jetson-orin"), arts, None)
    one = [_art("rpi5", "tflite", ["tflite"])]
    assert choose_bundle(pi, one, []).sha256 == "rpi5-tflite"  # one bundle: deploy it (mismatch warned)


def test_backend_follows_the_manifests_preference_then_the_devices_order():
    """The controller predicts the backend as runtime.load() chooses it on the device."""
    from edgekit.deploy.session import DeviceSession

    s = DeviceSession.__new__(DeviceSession)
    both = {"onnxruntime": protocol.Backend(True, "1.32"), "openvino": protocol.Backend(True, "2026.4")}
    s._backends = both
    assert s.check_backend("onnx") == "onnxruntime 1.32"
    assert s.check_backend("onnx", "openvino") == "openvino 2026.4"
    s._backends = {"onnxruntime": both["onnxruntime"], "openvino": protocol.Backend(False, error="not installed")}
    assert s.check_backend("onnx", "openvino") == "onnxruntime 1.32"     # load() falls back the same way
    s._backends = {"litert": protocol.Backend(True, "2.3")}
    assert s.check_backend("tflite", "openvino") == "litert 2.3"         # a preference for another format


# --- inventory selection ---------------------------------------------------------------------

def test_inventory_selection(tmp_path):
    p = tmp_path / "devices.toml"
    p.write_text('[devices.a]\nhost = "h1"\ngroups = ["kitchen", "all-pis"]\n'
                 '[devices.b]\nhost = "h2"\ngroups = ["all-pis"]\n[devices.c]\nhost = "h3"\n')
    inv = load_inventory(p)
    assert [d.name for d in inv.select(group="all-pis")] == ["a", "b"]
    assert [d.name for d in inv.select(device="c")] == ["c"]
    assert [d.name for d in inv.select(all_devices=True)] == ["a", "b", "c"]
    with pytest.raises(InventoryError, match="exactly one"):
        inv.select(device="a", group="kitchen")
    with pytest.raises(InventoryError, match="no device in group 'garage'.*") as e:
        inv.select(group="garage")
    assert "all-pis, kitchen" in e.value.hint
    with pytest.raises(InventoryError, match="no device 'zz'"):
        inv.select(device="zz")
    p.write_text('[devices.a]\nhost = "h"\npassword = "x"\n')
    with pytest.raises(InventoryError, match="no passwords"):
        load_inventory(p)


# --- rollout plans -----------------------------------------------------------------------------

NAMES = [f"d{i}" for i in range(10)]


def test_plan_canary_then_cumulative_stages():
    p = Plan(canary=Share.parse("1"), stages=Share.parse_list("10%,50%,100%"))
    assert p.batches(NAMES) == [["d0"], ["d1", "d2", "d3", "d4"], NAMES[5:]]
    assert p.labels(3) == ["canary", "batch 1", "batch 2"]
    p = Plan(canary=Share.parse("20%"), batch_size=Share.parse("3"))
    assert [len(b) for b in p.batches(NAMES)] == [2, 3, 3, 2]
    assert Plan().batches(NAMES) == [NAMES]                       # not staged: one batch
    assert Plan(canary=Share.parse("50")).batches(NAMES) == [NAMES]  # a canary as large as the fleet
    assert sum(Plan(stages=Share.parse_list("1%,100%")).batches(NAMES), []) == NAMES
    assert Plan(canary=Share.parse("1"), stages=Share.parse_list("10%,50%,100%")).batches(["x"]) == [["x"]]


@pytest.mark.parametrize("kw, msg", [
    (dict(stages=Share.parse_list("50%,10%,100%")), "must grow"),
    (dict(stages=Share.parse_list("10%,50%")), "last of --batches must be 100%"),
    (dict(stages=Share.parse_list("2,100%")), "percentages"),
    (dict(stages=Share.parse_list("100%"), batch_size=Share.parse("2")), "not both"),
    (dict(max_fail=1.5), "--max-fail"),
    (dict(offline="maybe"), "--offline"),
    (dict(abort_rollback="some"), "--abort-rollback"),
    (dict(timeout=0), "--timeout"),
    (dict(max_p50_ms=-1), "--max-p50-ms"),
])
def test_plan_validation_names_the_option(kw, msg):
    with pytest.raises(RolloutError, match=msg):
        Plan(**kw)


def test_share_parse_and_round_trip():
    with pytest.raises(RolloutError, match="neither a count"):
        Share.parse("ten", "--canary")
    with pytest.raises(RolloutError, match="percentage"):
        Share.parse("0%")
    assert Share.parse("10%").of(7) == 1 and Share.parse("50%").of(7) == 4 and Share.parse("3").of(2) == 2
    p = Plan(canary=Share.parse("2"), stages=Share.parse_list("25%,100%"), max_fail=0.1, offline="skip",
             max_p50_ms=3.5, timeout=30)
    assert Plan.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    with pytest.raises(RolloutError, match="unknown keys"):
        Plan.from_dict({**p.to_dict(), "canaryy": 1})


def test_max_fail_follows_ansible():
    assert not exceeds(0, 4, 0.0) and exceeds(1, 4, 0.0)
    assert not exceeds(1, 4, 0.25) and exceeds(2, 4, 0.25)   # "more than" P%
    states = ["deployed", "unchanged", "rolled-back", "failed", "skipped-offline"]
    assert batch_failed(states, "skip") == 2 and batch_failed(states, "fail") == 3


# --- the protocol ------------------------------------------------------------------------------

def test_release_argv_and_typed_replies():
    a = protocol.release_args("activate", "/r oot", name="m", sha="ab", incoming=".incoming-x", keep=2)
    assert a == ["release", "activate", "--root", "/r oot", "--name", "m", "--sha", "ab", "--incoming",
                 ".incoming-x", "--keep", "2"]
    assert protocol.argv("py", *a)[:3] == ["py", "-m", "edgekit.runtime"]
    st = protocol.DeviceStatus.parse({
        "root": "/r", "free_bytes": 10, "removed_incoming": [],
        "backends": {"onnxruntime": {"available": True, "version": "1.2"}, "litert": {"available": False,
                                                                                      "error": "absent"}},
        "models": {"m": {"current": "a" * 64, "releases": [{"sha256": "a" * 64, "target": "rpi4"}],
                         "history": ["a" * 64], "incoming": [],
                         "health": {"ok": False, "min_snr_db": 20, "outputs": {
                             "y": {"snr_db": 3.0, "top1_agreement": 0.5, "ok": False}}}}}})
    assert st.model("m").has("a" * 64) and not st.model("other").has("a" * 64)
    assert protocol.runnable_formats(st.backends) == ["onnx"]
    assert "y: SNR 3.0 dB" in st.model("m").health.why()
    act = protocol.Activation.parse({"name": "m", "sha256": "b", "status": "rolled-back", "previous": "a",
                                     "current": "a", "health": {"ok": False, "error": "boom"}})
    assert act.health.why() == "boom" and act.current == "a"


def test_tree_digest_is_the_bundle_release_id(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"x" * 100)
    (tmp_path / "sub" / "b.txt").write_text("y")
    from edgekit.bundle import sha256_file

    files = {p.relative_to(tmp_path).as_posix(): sha256_file(p) for p in tmp_path.rglob("*") if p.is_file()}
    assert tree_digest(files) == sha256_tree(tmp_path)


def test_rollout_record_round_trip(tmp_path, monkeypatch):
    from edgekit.deploy import ops
    from edgekit.deploy.inventory import Inventory
    from edgekit.deploy.rollout import Rollout, read_record

    monkeypatch.setenv("EDGEKIT_ROLLOUTS", str(tmp_path / "rollouts"))
    devs = [Device(f"d{i}", "h") for i in range(5)]
    plan = Plan(canary=Share.parse("1"), stages=Share.parse_list("50%,100%"), max_fail=0.2)
    r = Rollout.create(plan, [_art("rpi4", "tflite", ["tflite"])], devs, ops.Options(Inventory(tmp_path / "i.toml")),
                       tmp_path / "i.toml", str(tmp_path), rollout_id="digits-test")
    r.save()
    rec = read_record("digits-test")
    assert rec == json.loads(json.dumps(r.record)) and Plan.from_dict(rec["plan"]) == plan
    assert [b["devices"] for b in rec["batches"]] == [["d0"], ["d1", "d2"], ["d3", "d4"]]
    assert {d["state"] for d in rec["devices"].values()} == {"pending"}
    with pytest.raises(RolloutError, match="no rollout 'nope'"):
        read_record("nope")
    with pytest.raises(RolloutError, match="not a rollout id"):
        read_record("../etc/passwd")
