"""Low-rank factorization (edgekit factorize): a trained MLP and CNN (Keras) at rank ratio 0.25, each
converting afterwards with its fidelity reported; a tiny causal LM's MLPs (HF folder -> HF folder, INT4
afterwards); PyTorch modules; the rank rules; layers where it does not pay left alone."""

import json
from pathlib import Path

import keras
import numpy as np
import pytest
import torch
from tinylm import corpus_text, tiny_lm  # noqa: F401  (the session's tiny Llama)

from edgekit.errors import DataError
from edgekit.optimize.factorize import Layer, RankRule, factorize_module, plan_ranks, rebuild_keras


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: one torch thread does it as fast, and does not spin against the rest of the suite."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def mlp(digits, tmp_path_factory):
    """A Dense-dominated digits classifier (64 -> 256 -> 256 -> 10), trained here."""
    model_path, _, val = digits
    d = tmp_path_factory.mktemp("mlp")
    tr = np.load(model_path.parent / "train.npz")
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 1), name="image")
    h = keras.layers.Flatten()(inp)
    h = keras.layers.Dense(256, activation="relu", name="fc1")(h)
    h = keras.layers.Dense(256, activation="relu", name="fc2")(h)
    out = keras.layers.Dense(10, name="logits")(h)
    m = keras.Model(inp, out)
    m.compile(optimizer=keras.optimizers.Adam(1e-3),
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    m.fit(tr["image"], tr["labels"], epochs=12, batch_size=32, verbose=0)
    m.save(d / "mlp.keras")
    return d / "mlp.keras", model_path.parent / "train.npz", val


def test_mlp_at_rank_ratio_quarter_fine_tuned_and_converted(cli, mlp, tmp_path):
    model, train, val = mlp
    out = tmp_path / "mlp-lr.keras"
    r = cli("factorize", model, "--rank-ratio", "0.25", "--data", train, "--val", val, "--epochs", "3",
            "-t", "x86-avx2", "-o", out, "--json", "-q")
    assert r.exit_code == 0, r.stderr
    res = json.loads(r.stdout)
    rows = {x["layer"]: x for x in res["layers"]}
    assert rows["fc1"]["rank"] == 16 and rows["fc2"]["rank"] == 64  # 0.25 x min(64, 256), 0.25 x 256
    assert rows["fc2"]["params_after"] == 64 * 512 and rows["fc2"]["flops_after"] == 2 * 64 * 512
    assert not rows["logits"]["factorized"] and "output layer" in rows["logits"]["note"]
    assert all(0 < rows[n]["output_rel_err"] < 1 and rows[n]["energy_kept"] < 1 for n in ("fc1", "fc2"))
    # 16 x (64 + 256) + 64 x (256 + 256) weights instead of 64 x 256 + 256 x 256; biases and the output layer kept
    kept = 256 + 256 + 2570
    assert res["after"]["params"] == 16 * 320 + 64 * 512 + kept and res["before"]["params"] == 64 * 256 + 256 * 256 + kept
    assert res["accuracy_drop"] <= 3.0, res["accuracy_drop"]
    assert res["after"]["accuracy"] >= res["after_cut"]["accuracy"] - 1.0
    lowrank = keras.models.load_model(out)
    assert {"fc1_lowrank", "fc2_lowrank"} <= {x.name for x in lowrank.layers}
    assert lowrank.count_params() == res["after"]["params"]
    (b,) = res["bundles"]
    assert b["target"] == "x86-avx2" and b["before_p50_ms"] > 0 and b["after_p50_ms"] > 0 and b["speedup"] > 0
    assert b["after_metrics"]["top1_agreement"] > 0.9  # the INT8 bundle against its float model
    assert b["after_bytes"] < 0.6 * b["before_bytes"]
    assert json.loads((tmp_path / "mlp-lr.factorize.json").read_text())["rule"] == "rank-ratio 0.25"
    # edgekit report on the bundles shows the record kept beside them
    from edgekit.report import collect, render

    build = tmp_path / "mlp-lr.bundles"
    (build / "mlp-lr.factorize.json").write_text((tmp_path / "mlp-lr.factorize.json").read_text())
    html = render.render(collect.collect(build))
    assert "low-rank factorization, rank-ratio 0.25" in html and "fc2_lowrank" not in html and ">16/64<" in html


def test_cnn_at_rank_ratio_quarter_converts(cli, digits, tmp_path):
    model, calib, val = digits
    train = model.parent / "train.npz"
    out = tmp_path / "cnn-lr.keras"
    r = cli("factorize", model, "--rank-ratio", "0.25", "--data", train, "--val", val, "--epochs", "2",
            "--distill", "-o", out, "--json", "-q")
    assert r.exit_code == 0, r.stderr
    res = json.loads(r.stdout)
    rows = {x["layer"]: x for x in res["layers"]}
    assert rows["conv2"]["kind"] == "conv" and rows["conv2"]["rank"] == 16 and rows["conv2"]["shape"] == [288, 64]
    assert res["totals"]["flops_ratio"] < 0.5 and res["accuracy_drop"] <= 3.0
    # the factorized model converts like any other, its fidelity in the report
    r = cli("convert", out, "-t", "rpi4", "--format", "tflite", "--calib", calib, "--val", val, "--out",
            tmp_path / "b", "--json")
    assert r.exit_code == 0, r.stderr
    conv = json.loads(r.stdout)
    (bundle,) = conv["bundles"]
    assert bundle["validation"]["top1_agreement"] > 0.9


def test_tiny_lm_mlps_factorized_then_int4(tiny_lm, tmp_path):  # noqa: F811
    from transformers import AutoModelForCausalLM

    from edgekit.optimize.factorize_lm import factorize_lm
    from edgekit.optimize.lm import int4_bundle

    (tmp_path / "train.txt").write_text(corpus_text(400, 21))
    (tmp_path / "val.txt").write_text(corpus_text(60, 22))
    out = tmp_path / "lowrank"
    res = factorize_lm(str(tiny_lm), RankRule(rank_ratio=0.25), str(tmp_path / "train.txt"),
                       val=str(tmp_path / "val.txt"), epochs=1, max_steps=6, lr=1e-3, seq_len=32, out=str(out),
                       say=lambda t: None)
    rows = [x for x in res["layers"] if x.get("factorized")]
    assert len(rows) == 4 * 3 and all(x["layer"].split(".")[-1] in ("gate_proj", "up_proj", "down_proj")
                                      for x in rows)
    assert all(x["rank"] == 32 for x in rows)  # 0.25 x min(128, 256)
    assert res["totals"]["params_ratio"] < 0.85 and res["totals"]["flops_ratio"] < 0.75
    assert res["after"]["ppl"] < res["after_cut"]["ppl"]  # the fine-tune recovers part of the cut
    m = AutoModelForCausalLM.from_pretrained(out)
    w = m.model.layers[1].mlp.up_proj.weight.detach()
    assert w.shape == (256, 128) and int(torch.linalg.matrix_rank(w.double(), rtol=1e-5)) == 32
    assert json.loads((out / "edgekit_factorize.json").read_text())["ranks"]["model.layers.1.mlp.up_proj"] == 32
    # the folder keeps the factors themselves beside the products: A (rank x in), B (out x rank), W = B @ A
    from safetensors.numpy import load_file

    rec = json.loads((out / "edgekit_factorize.json").read_text())["lowrank"]
    fac = load_file(str(out / rec["file"]))
    up = rec["layers"]["model.layers.1.mlp.up_proj"]
    a, b = fac[up["A"]], fac[up["B"]]
    assert a.shape == (32, 128) and b.shape == (256, 32) and len(rec["layers"]) == 12
    np.testing.assert_allclose(b.astype(np.float64) @ a, w.double().numpy(), atol=1e-5)
    # the result converts like any other folder, its INT4 fidelity measured against itself in float
    i4 = int4_bundle(out, "x86-avx2", tmp_path / "b", name="lowrank", val=str(tmp_path / "val.txt"),
                     bench_tokens=16, say=lambda t: None)
    assert i4["fidelity"]["top1_agreement"] > 0.5 and i4["decode_tok_s"] > 0
    _check_two_node_bundle(tiny_lm, Path(i4["bundle"]), fac, rec, tmp_path)
    # factors that no longer multiply to the folder's weights (the folder edited afterwards) are refused
    import shutil

    from safetensors.numpy import save_file

    from edgekit.convert import llm_lowrank
    from edgekit.errors import SourceModelError

    edited = tmp_path / "edited"
    shutil.copytree(out, edited)
    save_file(dict(fac, **{up["B"]: fac[up["B"]] * 1.1}), str(edited / rec["file"]))
    with pytest.raises(SourceModelError, match="model.layers.1.mlp.up_proj's weight is not the product"):
        llm_lowrank.apply(edited, tmp_path / "plain")


def _check_two_node_bundle(source, bundle, fac, rec, tmp_path):
    """The INT4 bundle of a factorized folder holds each MLP projection as two MatMulNBits (x A^T, then B^T) at
    the build's bits / block / accuracy level, fewer weight bytes than the builder's one-node build of the
    original, and its pairs compute x A^T B^T within 4-bit quantization error; it loads and generates."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    from edgekit.convert.llm import LLMBuildOptions, read_source, run_builder, weight_bytes
    from edgekit.convert.llm_graph import node_constants
    from edgekit.runtime import load

    man = json.loads((bundle / "manifest.json").read_text())
    low = man["lowrank"]
    assert low["factorized"] == 12 and low["left"] == {} and low["bytes_after"] < 0.5 * low["bytes_before"]
    assert "edgekit_lowrank.json" in man["model"]["files"]
    m = onnx.load(str(bundle / "model" / "model.onnx"), load_external_data=False)
    plain_dir = tmp_path / "plain"
    run_builder(read_source(str(source)), LLMBuildOptions("int4"), plain_dir, tmp_path / "cache", {})
    plain = onnx.load(str(plain_dir / "model.onnx"), load_external_data=False)
    nbits = [n for n in m.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == sum(n.op_type == "MatMulNBits" for n in plain.graph.node) + 12
    assert weight_bytes(bundle / "model")["weights"] < 0.85 * weight_bytes(plain_dir)["weights"]
    full = onnx.load(str(bundle / "model" / "model.onnx"))
    nodes = {n.name: n for n in full.graph.node}
    attrs = lambda n: {x.name: helper.get_attribute_value(x) for x in n.attribute}  # noqa: E731
    first, second = nodes["/model/layers.1/mlp/up_proj/lowrank_A_Q4"], nodes["/model/layers.1/mlp/up_proj/MatMul_Q4"]
    assert second.input[0] == first.output[0] and second.output[0] == "/model/layers.1/mlp/up_proj/MatMul/output_0"
    assert (attrs(first)["K"], attrs(first)["N"], attrs(second)["K"], attrs(second)["N"]) == (128, 32, 32, 256)
    assert all(attrs(n)["bits"] == 4 and attrs(n)["block_size"] == 32 and attrs(n)["accuracy_level"] == 4
               for n in (first, second))
    # the pair alone, run by ONNX Runtime, against the float product of the folder's factors
    consts = [node_constants(full.graph, n) for n in (first, second)]   # scales fp16 behind Casts (llm_graph)
    g = helper.make_graph([c for cs, _ in consts for c in cs] + [first, second], "pair",
                          [helper.make_tensor_value_info(first.input[0], 1, ["n", 128])],
                          [helper.make_tensor_value_info(second.output[0], 1, ["n", 256])],
                          [t for _, ts in consts for t in ts])
    sub = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    x = np.random.default_rng(1).standard_normal((8, 128)).astype(np.float32)
    sess = ort.InferenceSession(sub.SerializeToString(), providers=["CPUExecutionProvider"])
    y = sess.run(None, {first.input[0]: x})[0]
    up = rec["layers"]["model.layers.1.mlp.up_proj"]
    ref = x.astype(np.float64) @ fac[up["A"]].T @ fac[up["B"]].T
    err = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
    assert 1e-4 < err < 0.2, err     # quantized (not float), within two 4-bit roundings
    assert low["layers"]["model.layers.1.mlp.up_proj"]["rel_err"] == pytest.approx(err, abs=0.05)
    lm = load(bundle)
    assert lm.generate("The robot", max_new_tokens=8).strip()
    assert abs(man["fidelity"]["ppl_increase"]) < 0.2, man["fidelity"]


def test_torch_module_linear_and_conv():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(8, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(32 * 6 * 6, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64))
    x = torch.randn(4, 8, 6, 6)
    new, rec = factorize_module(net, RankRule(rank_ratio=0.25), (x,))
    rows = {r["layer"]: r for r in rec["layers"]}
    assert rows["0"]["rank"] == 8 and rows["0"]["flops_before"] == 2 * 36 * 72 * 32
    assert rows["3"]["rank"] == 16 and isinstance(new[3], torch.nn.Sequential)
    assert rows["5"]["rank"] == 16 and rec["params_after"] < rec["params_before"]
    # at full energy nothing is cut; a rank that does not pay is left alone and said so
    same, rec1 = factorize_module(net, RankRule(energy=1.0), (x,))
    assert not any(r["factorized"] for r in rec1["layers"])
    with torch.no_grad():
        assert torch.equal(same(x), net(x))
    _, rec2 = factorize_module(net, RankRule(rank_ratio=0.6), (x,))
    assert not {r["layer"]: r for r in rec2["layers"]}["5"]["factorized"]
    assert "more than" in {r["layer"]: r for r in rec2["layers"]}["5"]["note"]
    # a layer's output error is what its factors give on its real input in the original network
    with torch.no_grad():
        h = net[:3](x)
        y, y2 = net[3](h), new[3](h)
    assert rows["3"]["output_rel_err"] == pytest.approx(float((y - y2).norm() / y.norm()), rel=1e-4)


def test_torch_export_program_from_the_cli(cli, digits, tmp_path):
    """`edgekit factorize net.pt2`: a torch.export program's linear layers (not its output layer) become two, the
    result is a .pt2 again, and it converts with its fidelity reported."""
    _, calib, val = digits
    tr = np.load(calib.parent / "train.npz")
    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.out = torch.nn.Linear(64, 256), torch.nn.Linear(256, 256), torch.nn.Linear(256, 10)

        def forward(self, image):
            h = torch.relu(self.fc1(image.reshape(image.shape[0], -1)))
            return self.out(torch.relu(self.fc2(h)))

    net = Net()
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    x, y = torch.from_numpy(tr["image"]), torch.from_numpy(tr["labels"]).long()
    for i in range(300):
        j = torch.randint(0, len(x), (32,))
        loss = torch.nn.functional.cross_entropy(net(x[j]), y[j])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    torch.export.save(torch.export.export(net, (x[:1],)), tmp_path / "net.pt2")  # batch 1, as convert runs it
    r = cli("factorize", tmp_path / "net.pt2", "--rank-ratio", "0.25", "--data", calib.parent / "train.npz",
            "--val", val, "--json", "-q")
    assert r.exit_code == 0, r.stderr
    res = json.loads(r.stdout)
    rows = {x["layer"]: x for x in res["layers"]}
    assert rows["fc1"]["rank"] == 16 and rows["fc2"]["rank"] == 64 and not rows["out"]["factorized"]
    assert res["after"]["params"] == res["before"]["params"] - 64 * 256 - 256 * 256 + 16 * 320 + 64 * 512
    assert res["before"]["accuracy"] > 80 and res["before"]["accuracy"] - res["after"]["accuracy"] < 15
    assert 0 < res["outputs"]["output_rel_err"] < 0.5 and res["saved"].endswith("net-lowrank.pt2")
    ep = torch.export.load(res["saved"])
    assert sum(n.target is torch.ops.aten.linear.default for n in ep.graph.nodes) == 5
    r = cli("convert", res["saved"], "-t", "x86-avx2", "--format", "onnx", "--calib", calib, "--val", val, "--out",
            tmp_path / "b", "--json")
    assert r.exit_code == 0, r.stderr
    (bundle,) = json.loads(r.stdout)["bundles"]
    assert bundle["validation"]["top1_agreement"] > 0.9


def test_rank_rules_and_budgets():
    rng = np.random.default_rng(0)
    # a spectrum that falls fast: a few directions hold most of the energy
    u, _ = np.linalg.qr(rng.normal(size=(128, 64)))
    v, _ = np.linalg.qr(rng.normal(size=(64, 64)))
    w = (u * (0.5 ** np.arange(64))) @ v.T
    ly = Layer("a", "dense", w, 1)
    assert ly.rank_for(RankRule(energy=0.9)) == 2   # squared values 1, 1/4, 1/16...: 0.75 after one, 0.94 after two
    assert ly.rank_for(RankRule(rank_ratio=0.25)) == 16
    a, b = ly.factors(2)
    assert np.linalg.norm(w - a @ b) / np.linalg.norm(w) < 0.3
    flat = Layer("b", "dense", rng.normal(size=(64, 64)), 1)
    plan = plan_ranks([ly, flat], RankRule(params_budget=0.5))
    total = sum(x.weights(plan[x.name]["rank"]) for x in (ly, flat))
    assert total <= 0.5 * (128 * 64 + 64 * 64)
    with pytest.raises(DataError, match="one of --rank-ratio"):
        RankRule(rank_ratio=0.5, energy=0.9)
    with pytest.raises(DataError, match="cannot be met"):
        plan_ranks([flat], RankRule(params_budget=0.01))


def test_keras_sequential_rebuild_is_exact_at_full_rank():
    keras.utils.set_random_seed(1)
    m = keras.Sequential([keras.Input((6, 6, 3)), keras.layers.Conv2D(8, 3, strides=2, activation="relu", name="c"),
                          keras.layers.Flatten(), keras.layers.Dense(5, name="d")])
    wc = m.get_layer("c").get_weights()[0]
    mat = wc.reshape(-1, 8).astype(np.float64)
    ly = Layer("c", "conv", mat, 4, 9)
    new = rebuild_keras(m, {"c": ly.factors(8)})
    x = np.random.default_rng(0).normal(size=(2, 6, 6, 3)).astype(np.float32)
    np.testing.assert_allclose(new.predict(x, verbose=0), m.predict(x, verbose=0), atol=1e-4)
    assert [type(x).__name__ for x in new.layers][:2] == ["Conv2D", "Conv2D"]


def test_mistakes(cli, mlp, tmp_path):
    model, train, val = mlp
    r = cli("factorize", model, "--rank-ratio", "0.25", "--energy", "0.9", "--data", train)
    assert r.exit_code == 2 and "one of --rank-ratio" in r.stderr
    r = cli("factorize", model, "--rank-ratio", "1.5", "--data", train)
    assert r.exit_code == 2 and "must be in (0, 1]" in r.stderr
    r = cli("factorize", model, "--data", train, "--skip", "nope")
    assert r.exit_code == 2 and "--skip nope" in r.stderr
    r = cli("factorize", tmp_path / "net.pt2", "--data", train)
    assert r.exit_code == 2 and "model not found" in r.stderr
    r = cli("factorize", tmp_path / "net.pt", "--data", train)
    assert r.exit_code == 2 and "torch.export.save" in r.stderr and "factorize_module" in r.stderr
    r = cli("factorize", tmp_path / "net.pt2", "--data", train, "--epochs", "2")
    assert r.exit_code == 2 and "--epochs" in r.stderr
