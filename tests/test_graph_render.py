"""The drawn graph: what graph_view puts in the picture (no matplotlib needed), then the PNG/SVG and `minivq graph`."""
import os

import numpy as np
import pytest

import minivq as mv
from minivq import functional as F
from minivq.cli import main
from minivq.graph_draw import graph_view, layout, training_step

from conftest import write_blobs

try:
    import matplotlib  # noqa: F401
    HAVE_MPL = True
except ImportError:
    HAVE_MPL = False
needs_mpl = pytest.mark.skipif(not HAVE_MPL, reason="drawing needs matplotlib (pip install -e .[viz])")

TINY = dict(num_hiddens=8, num_residual_hiddens=4, num_residual_layers=2, embedding_dim=3, num_embeddings=10)


def step(estimator="straight_through", trace=True, decay=0.0, quantizer=None):
    """One recorded training step of the paper's model, small (or of ``decay`` and ``quantizer`` given)."""
    mv.manual_seed(0)
    quantizer = quantizer if quantizer is not None else mv.models.QuantizerOptions(estimator=estimator)
    model = mv.models.VQVAE(decay=decay, quantizer=quantizer, **TINY).double()
    x = mv.tensor(np.random.default_rng(2).uniform(-0.5, 0.5, (2, 1, 8, 8)))
    if trace:
        loss = training_step(model, x, 1 / 12)
    else:
        x_recon, vq = model(x)
        loss = F.mse_loss(x_recon, x) * 12 + vq.loss
        with mv.graph.record_grad_norms():
            loss.backward()
    return model, loss


def by_title(boxes, title):
    return [b for b in boxes.values() if b.title == title]


def test_the_cut_edges_are_exactly_the_stop_gradients_inputs_and_straight_throughs_z_q():
    model, loss = step()
    boxes, edges = graph_view(loss, dict(model.named_parameters()))
    cut = sorted((boxes[e.src].title, boxes[e.dst].name) for e in edges if e.state == "cut")
    assert cut == [("StopGradient", "z_e"), ("StopGradient", "z_q"), ("StraightThrough", "z_q")]
    st = by_title(boxes, "StraightThrough")[0]
    to_z_e = [e for e in edges if e.src == st.key and boxes[e.dst].name == "z_e"][0]
    assert to_z_e.state == "grad" and to_z_e.norm == pytest.approx(st.grad)      # passed on whole
    # the codebook is a leaf of its own, and its one edge carries the codebook's whole gradient
    codebook = [b for b in boxes.values() if b.kind == "leaf"]
    assert [b.title for b in codebook] == ["vq.codebook"]
    into = [e for e in edges if e.dst == codebook[0].key]
    assert len(into) == 1 and into[0].norm == pytest.approx(np.linalg.norm(model.vq.codebook.grad), rel=1e-10)


def test_the_default_quantizers_step_has_no_codebook_to_cut():
    """minivq's default quantiser (EMA codebook, cosine lookup in 8 dims): the codebook is a constant of the step,
    not a leaf the gradient is cut from; its projections and the normalisation sit in the quantiser's column."""
    model, loss = step(decay=0.99, quantizer=mv.models.DEFAULT_QUANTIZER)
    boxes, edges = graph_view(loss, dict(model.named_parameters()))
    assert not [e for e in edges if e.state == "cut"] and not [b for b in boxes.values() if b.kind == "leaf"]
    quantiser = sorted((b.title, b.name) for b in boxes.values() if b.group == "quantiser")
    assert quantiser.count(("Conv2d", None)) == 2          # project_in, project_out
    assert ("L2Normalize", None) in quantiser and ("StraightThrough", "quantized") in quantiser
    st = by_title(boxes, "StraightThrough")[0]
    to_search = [e for e in edges if e.src == st.key]
    assert len(to_search) == 1 and to_search[0].norm == pytest.approx(st.grad)    # passed on whole


def test_residual_blocks_collapse_and_the_columns_follow_the_modules():
    model, loss = step()
    boxes, edges = graph_view(loss, dict(model.named_parameters()))
    blocks = [b for b in boxes.values() if b.kind == "block"]
    assert sorted(b.where for b in blocks) == ["residual_stack.layers.0"] * 2 + ["residual_stack.layers.1"] * 2
    assert all(b.title == "Residual (ReLU-Conv-ReLU-Conv-Add)" and len(b.members) == 5 for b in blocks)
    # a block's parameters: one norm for its two convolutions' weights
    layer = model.encoder.residual_stack.layers[0].block
    expected = np.sqrt(sum(np.sum(p.grad ** 2) for p in (layer[1].weight, layer[3].weight)))
    block = [b for b in blocks if b.group == "encoder" and b.where.endswith("0")][0]
    assert block.params[0][0] == "weights" and block.params[0][2] == pytest.approx(expected, rel=1e-10)
    groups = {b.group for b in boxes.values()}
    assert groups == {"encoder", "quantiser", "decoder", "loss"}
    assert {b.title for b in boxes.values() if b.group == "quantiser"} >= {"StraightThrough", "StopGradient",
                                                                             "Embedding", "vq.codebook"}
    expanded, _ = graph_view(loss, dict(model.named_parameters()), collapse=())
    assert not [b for b in expanded.values() if b.kind == "block"]
    assert len(expanded) == len(boxes) + 4 * 4         # each block of 5 ops was one box


def test_without_a_trace_the_columns_come_from_the_names():
    model, loss = step(trace=False)
    boxes, _ = graph_view(loss, dict(model.named_parameters()))
    named = {b.name: b.group for b in boxes.values() if b.name}
    assert named["z_e"] == "encoder" and named["quantized"] == "quantiser" and named["x_recon"] == "decoder"
    assert by_title(boxes, "StraightThrough")[0].group == "quantiser"
    assert not [b for b in boxes.values() if b.kind == "block"]     # nothing to collapse by


def test_layout_puts_no_two_boxes_on_one_spot_and_runs_the_ring():
    model, loss = step()
    boxes, edges = graph_view(loss, dict(model.named_parameters()))
    frames = layout(boxes, edges)
    spots = [(round(b.x, 6), round(b.y, 6)) for b in boxes.values()]
    assert len(set(spots)) == len(spots)
    frame = {g: (lo, first, rows) for g, lo, _, first, rows in frames}
    assert frame["encoder"][0] < frame["quantiser"][0] == frame["loss"][0] < frame["decoder"][0]
    x_recon = [b for b in boxes.values() if b.name == "x_recon"][0]
    first_decoder = [b for b in boxes.values() if b.where == "decoder.conv_1"][0]
    assert x_recon.y < first_decoder.y          # the decoder runs up the right, towards the loss


@needs_mpl
@pytest.mark.parametrize("estimator", ["straight_through", "rotation"])
def test_render_writes_png_and_svg(tmp_path, estimator):
    model, loss = step(estimator)
    mv.graph.render(loss, tmp_path / "step.png", names=dict(model.named_parameters()))
    png = (tmp_path / "step.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 20000
    mv.graph.render(loss, str(tmp_path / "step.svg"))
    svg = (tmp_path / "step.svg").read_text()
    assert "<svg" in svg and ("RotationTrick" if estimator == "rotation" else "StraightThrough") in svg
    assert "cut" in svg and "vq.codebook" not in svg         # without names=, the codebook is a plain leaf
    with pytest.raises(ValueError, match="PNG or SVG"):
        mv.graph.render(loss, tmp_path / "step.jpg")
    with pytest.raises(ValueError, match="no graph"):
        mv.graph.render(mv.tensor(np.ones(2)), tmp_path / "leaf.png")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("graph")
    data = write_blobs(folder / "blobs.npz", 32, 8)
    assert main(["train", "--data", data, "--out", str(folder / "run"), "--steps", "2", "--batch", "8",
                 "--no-progress", "--num-hiddens", "8", "--residual-hiddens", "4", "--residual-layers", "1",
                 "--embedding-dim", "4", "--num-embeddings", "16"]) == 0
    return str(folder / "run" / "checkpoint.npz")


@needs_mpl
def test_minivq_graph_draws_a_checkpoints_training_step(checkpoint, tmp_path, capsys):
    out = tmp_path / "graph.png"
    assert main(["graph", checkpoint, "--out", str(out), "--batch", "4"]) == 0
    assert out.read_bytes().startswith(b"\x89PNG") and f"wrote {out}" in capsys.readouterr().err
    assert main(["graph", checkpoint, "--out", str(tmp_path / "graph.svg"), "--expand"]) == 0
    assert "<svg" in (tmp_path / "graph.svg").read_text()


def test_minivq_graph_errors_are_one_line(checkpoint, tmp_path, capsys):
    cases = [(["--out", str(tmp_path / "g.txt")], "PNG or SVG")]
    if HAVE_MPL:
        cases.append((["--out", str(tmp_path / "g.png"), "--batch", "1000"], "larger than the training set"))
    else:       # refused before any work
        cases.append((["--out", str(tmp_path / "g.png")], "needs matplotlib: pip install -e .[viz]"))
    for argv, message in cases:
        assert main(["graph", checkpoint, *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("minivq graph: error:") and message in err[0], err
        assert not os.path.exists(argv[1])


def test_the_docs_figure_draws_the_readmes_step(tmp_path):
    """docs/make_graph.py draws the step the README prints: the same norms, the same cut edges."""
    import importlib.util
    import re
    from test_readme import engine_section
    docs = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "docs")
    spec = importlib.util.spec_from_file_location("make_graph", os.path.join(docs, "make_graph.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model, loss = module.step()
    boxes, edges = graph_view(loss, dict(model.named_parameters()))
    _, shown = engine_section()
    for title, name in (("StraightThrough", "quantized"), ("Conv2d", "z_e"), ("ConvTranspose2d", "x_recon")):
        row = [re.split(r"\s{2,}", line) for line in shown.splitlines() if f"{title} -> {name}" in line][0]
        box = [b for b in boxes.values() if b.title == title and b.name == name][0]
        assert box.grad == pytest.approx(float(row[3]), rel=2e-4)
    assert sum(e.state == "cut" for e in edges) == 3
    assert os.path.exists(os.path.join(docs, "graph-step.png"))
    if HAVE_MPL:
        module.main(str(tmp_path / "step.png"))
        assert (tmp_path / "step.png").read_bytes().startswith(b"\x89PNG")
