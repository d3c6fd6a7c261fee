"""--log-grads and --compare-estimators: what a logged step holds, against the formulas; and `minivq plot` of several logs."""
import json
import os

import numpy as np
import pytest

import minivq as mv
from minivq import functional as F
from minivq.cli import main
from minivq.plot import run_labels, usage_matrix
from minivq.train import estimator_output, gradient_report

from conftest import read_log, write_blobs

try:
    import matplotlib  # noqa: F401
    HAVE_MPL = True
except ImportError:
    HAVE_MPL = False
needs_mpl = pytest.mark.skipif(not HAVE_MPL, reason="plotting needs matplotlib (pip install -e .[viz])")

TINY = ["--num-hiddens", "8", "--residual-hiddens", "4", "--residual-layers", "1", "--embedding-dim", "4",
        "--num-embeddings", "16"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """4-step runs of the paper's quantiser: straight-through with both options, rotation with both, its EMA
    codebook with --log-grads, --compare-estimators alone; and minivq's default quantiser with both options."""
    folder = tmp_path_factory.mktemp("gradlog")
    data = write_blobs(folder / "blobs.npz", 64, 16)
    base = ["train", "--data", data, "--steps", "4", "--batch", "8", "--log-every", "2", "--eval-every", "4",
            "--no-progress", *TINY]
    for name, extra in [("st", ["--paper-quantizer", "--log-grads", "--compare-estimators"]),
                        ("rot", ["--paper-quantizer", "--log-grads", "--compare-estimators", "--estimator",
                                 "rotation"]),
                        ("ema", ["--paper-quantizer", "--log-grads", "--ema"]),
                        ("cmp", ["--paper-quantizer", "--compare-estimators"]),
                        ("default", ["--log-grads", "--compare-estimators"])]:
        assert main([*base, "--out", str(folder / name), *extra]) == 0
    return folder


def train_records(folder):
    return [r for r in read_log(folder) if r["split"] == "train"]


def test_log_grads_logs_the_norms_at_z_e_the_codebook_and_the_code_usage(runs):
    for record in train_records(runs / "st"):
        assert {"z_e_grad_recon", "z_e_grad_commit", "codebook_grad", "code_counts", "grad_norms"} <= set(record)
        counts = record["code_counts"]
        assert sum(counts["count"]) == 8 * 4 * 4             # every latent of the batch, once
        assert counts["index"] == sorted(counts["index"]) and all(c > 0 for c in counts["count"])
        assert len(counts["index"]) == record["codes_used"]
        assert record["codebook_grad"] == pytest.approx(record["grad_norms"]["vq"])    # vq's only parameter
        assert 0 < record["estimator_norm_ratio"] and -1 <= record["estimator_cosine"] <= 1
    ema = train_records(runs / "ema")[0]
    assert "codebook_grad" not in ema and "z_e_grad_commit" in ema        # the EMA codebook has no gradient
    only = train_records(runs / "cmp")[0]
    assert "estimator_cosine" in only and "grad_norms" not in only and "code_counts" not in only
    for record in train_records(runs / "default"):      # EMA codebook, cosine lookup in 8 dims: no exact split
        assert {"z_e_grad", "code_counts", "grad_norms", "estimator_cosine"} <= set(record)
        assert not {"z_e_grad_recon", "z_e_grad_commit", "codebook_grad"} & set(record)
        assert record["z_e_grad"] > 0 and sum(record["code_counts"]["count"]) == 8 * 4 * 4
        assert "vq.project_in" in record["grad_norms"] and "vq.project_out" in record["grad_norms"]


def test_gradient_report_against_the_formulas():
    """The split at z_e, the codebook's norm, the counts and the estimators' comparison, by hand (the paper's
    quantiser: the split is exact for the l2 lookup in D dimensions)."""
    mv.manual_seed(0)
    model = mv.models.VQVAE(num_hiddens=8, num_residual_hiddens=4, num_residual_layers=1, embedding_dim=3,
                            num_embeddings=10, decay=0.0, quantizer=mv.models.PAPER_QUANTIZER).double()
    x = mv.tensor(np.random.default_rng(2).uniform(-0.5, 0.5, (2, 1, 8, 8)))
    x_recon, vq = model(x)
    vq.z_e.retain_grad()
    out = estimator_output(vq)
    assert out is vq.quantized and out.creator.name == "StraightThrough"
    out.retain_grad()
    (F.mse_loss(x_recon, x) * 12 + vq.loss).backward()
    report = gradient_report(model, vq, counts=vq.counts, estimator_out=out)
    commit = 2 * 0.25 * (vq.z_e.data - vq.z_q.data) / vq.z_e.data.size
    assert report["z_e_grad_commit"] == pytest.approx(np.linalg.norm(commit), rel=1e-12)
    # straight-through: the reconstruction's part at z_e is the gradient at the estimator's output
    assert report["z_e_grad_recon"] == pytest.approx(np.linalg.norm(out.grad), rel=1e-10)
    assert report["codebook_grad"] == pytest.approx(np.linalg.norm(model.vq.codebook.grad), rel=1e-12)
    used = np.flatnonzero(np.bincount(vq.indices.ravel(), minlength=10))
    assert report["code_counts"]["index"] == used.tolist()
    assert report["code_counts"]["count"] == np.bincount(vq.indices.ravel())[used].tolist()
    rotated = F.rotation_trick(mv.tensor(vq.z_e.data, requires_grad=True), mv.tensor(vq.z_q.data))
    e = rotated.creator.inputs[0]
    rotated.backward(out.grad)
    assert report["estimator_norm_ratio"] == pytest.approx(np.linalg.norm(e.grad) / np.linalg.norm(out.grad))
    assert report["estimator_cosine"] == pytest.approx(
        (e.grad * out.grad).sum() / np.linalg.norm(e.grad) / np.linalg.norm(out.grad))


def test_a_rotation_runs_reconstruction_gradient_is_the_rotated_one(runs):
    """In a rotation run, |z_e's reconstruction gradient| / |straight-through's| is the logged norm ratio."""
    for record in train_records(runs / "rot"):
        assert record["z_e_grad_recon"] > 0 and record["estimator_norm_ratio"] > 0
    mv.manual_seed(0)
    model = mv.models.VQVAE(num_hiddens=8, num_residual_hiddens=4, num_residual_layers=1, embedding_dim=3,
                            num_embeddings=10, decay=0.0,
                            quantizer=mv.models.QuantizerOptions(estimator="rotation")).double()
    x = mv.tensor(np.random.default_rng(2).uniform(-0.5, 0.5, (2, 1, 8, 8)))
    x_recon, vq = model(x)
    vq.z_e.retain_grad()
    out = estimator_output(vq)
    out.retain_grad()
    (F.mse_loss(x_recon, x) * 12 + vq.loss).backward()
    report = gradient_report(model, vq, estimator_out=out)
    assert report["z_e_grad_recon"] == pytest.approx(report["estimator_norm_ratio"] * np.linalg.norm(out.grad),
                                                     rel=1e-9)


def test_usage_matrix_and_run_labels():
    records = [{"step": 2, "code_counts": {"index": [1, 5], "count": [3, 1]}},
               {"step": 4, "code_counts": {"index": [5, 7], "count": [4, 2]}}, {"step": 4, "split": "test"}]
    steps, codes, counts = usage_matrix(records)
    assert steps == [2, 4]
    assert codes == [5, 1, 7]       # by total use: 5, 3, 2
    assert counts == [[1, 4], [3, 0], [0, 2]]
    assert run_labels(["runs/a/metrics.jsonl", "runs/b/metrics.jsonl"]) == ["a", "b"]
    same = run_labels(["x/run/metrics.jsonl", "y/run/metrics.jsonl"])
    assert same[0] != same[1] and same[0].endswith(os.path.join("x", "run"))


@needs_mpl
def test_minivq_plot_overlays_several_logs(runs, tmp_path, capsys):
    out = tmp_path / "curves.png"
    logs = [str(runs / name / "metrics.jsonl") for name in ("st", "rot", "ema")]
    assert main(["plot", *logs, "--out", str(out)]) == 0
    assert out.read_bytes().startswith(b"\x89PNG")
    assert main(["plot", logs[0], "--out", str(tmp_path / "one.png")]) == 0          # one log, as before
    assert main(["plot", logs[0], str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "x.png")]) == 2
    assert "no such metrics log" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


@needs_mpl
def test_plot_panels(runs, tmp_path):
    """The figure's axes: log-scale loss, the z_e norms, grouped per-layer lines with the legend outside, heatmaps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from minivq import plot
    seen = {}
    original = plt.close

    def keep(fig):
        seen["fig"] = fig
    plt.close = keep
    try:
        plot.plot_metrics([str(runs / "st" / "metrics.jsonl"), str(runs / "rot" / "metrics.jsonl")],
                          str(tmp_path / "c.png"))
    finally:
        plt.close = original
    fig = seen["fig"]
    axes = {ax.get_title(): ax for ax in fig.axes}
    assert axes["training loss (log scale)"].get_yscale() == "log"
    assert len(axes["training loss (log scale)"].lines) == 2                       # one colour per run
    colours = {tuple(line.get_color()) for line in axes["training loss (log scale)"].lines}
    assert len(colours) == 2
    norms = axes["gradient norm at z_e and of the codebook"]
    assert {line.get_linestyle() for line in norms.lines} >= {"-", "--", ":"}
    layers = axes["gradient norm per layer, st"]
    legend = layers.get_legend()
    box = legend.get_window_extent(fig.canvas.get_renderer())
    assert box.x0 > layers.get_window_extent(fig.canvas.get_renderer()).x1      # outside the axes
    styles = {line.get_label(): (line.get_linestyle(), line.get_linewidth()) for line in layers.lines}
    assert styles["vq (the codebook)"][1] > styles["encoder.conv_1"][1]
    assert styles["decoder.conv_1"][0] == "--" and styles["encoder.conv_1"][0] == "-"
    heat = [ax for title, ax in axes.items() if title.startswith("per-code usage, st")][0]
    assert heat.images and heat.images[0].get_array().shape[1] == 2             # two logged steps
    plt.close(fig)


# ---------------------------------------------------------------- on the device (the strict fake CuPy)
from test_fake_cupy import fake_cupy, tiny_npz  # noqa: E402,F401  (fixtures)


def test_log_grads_compare_estimators_and_graph_on_cuda(fake_cupy, tiny_npz, tmp_path, capsys):   # noqa: F811
    """The new logging and the drawn graph take device arrays without an implicit host copy."""
    out = tmp_path / "run"
    argv = ["train", "--data", tiny_npz, "--out", str(out), "--steps", "2", "--batch", "8", "--log-every", "1",
            "--no-progress", "--device", "cuda", "--kernel", "numpy", "--log-grads", "--compare-estimators",
            *TINY]
    assert main(argv) == 0, capsys.readouterr().err
    record = train_records(out)[0]
    assert sum(record["code_counts"]["count"]) == 8 * 4 * 4 and "estimator_cosine" in record
    from minivq.graph_draw import graph_view, training_step
    mv.manual_seed(0)
    model = mv.models.VQVAE(num_hiddens=8, num_residual_hiddens=4, num_residual_layers=1, embedding_dim=4,
                            num_embeddings=16, decay=0.0, quantizer=mv.models.PAPER_QUANTIZER,
                            kernel="numpy").to("cuda")      # the paper's: its codebook loss cuts a third edge
    x = mv.tensor(np.random.default_rng(0).uniform(-0.5, 0.5, (2, 1, 8, 8)).astype(np.float32), device="cuda")
    loss = training_step(model, x, 1 / 12)
    boxes, edges = graph_view(loss, dict(model.named_parameters()))
    assert sum(e.state == "cut" for e in edges) == 3 and all(isinstance(e.norm, (float, type(None))) for e in edges)
    text = mv.graph.format_graph(loss, names=dict(model.named_parameters()))
    assert "StraightThrough -> quantized" in text and "z_q: cut" in text
    if HAVE_MPL:
        assert main(["graph", str(out / "checkpoint.npz"), "--device", "cuda", "--out", str(tmp_path / "g.png")]) \
            == 0, capsys.readouterr().err
        assert (tmp_path / "g.png").read_bytes().startswith(b"\x89PNG")
