"""The prior's quality figures: the context-free references train-prior reports, and the PyTorch twin.

The twin (benchmarks/torch_pixelcnn.py) is the peer that benchmarks/prior_vs_torch.py
trains beside minivq's prior; these tests hold it to minivq's forward pass, loss,
gradients and Adam step on the same weights (skipped where torch is missing).
"""
import json
import math
import os
import sys

import numpy as np
import pytest

import minivq as mv
from minivq.cli import main
from minivq.io import load
from minivq.models import GatedPixelCNN
from minivq.prior import context_free_references, position_unigram_bits, unigram_bits

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


# -- the context-free references, against a hand computation

TRAIN = np.array([[[0, 1]], [[0, 2]], [[1, 1]]])      # three 1 x 2 grids, K = 3
TEST = np.array([[[0, 1]], [[2, 2]]])


def test_unigram_cross_entropy_by_hand():
    # training counts 2, 3, 1 (+0.5 each): 2.5, 3.5, 1.5 of 7.5; test codes 0, 1, 2, 2
    expected = -(math.log2(2.5 / 7.5) + math.log2(3.5 / 7.5) + 2 * math.log2(1.5 / 7.5)) / 4
    assert unigram_bits(TRAIN, TEST, 3) == pytest.approx(expected, rel=1e-12)
    # a code never seen in training costs log2(total / 0.5) bits, not infinity
    assert unigram_bits(np.zeros((2, 1, 1), np.int64), np.ones((1, 1, 1), np.int64), 4) == \
        pytest.approx(math.log2(4.0 / 0.5), rel=1e-12)


def test_per_position_unigram_cross_entropy_by_hand():
    # position 0 sees 0, 0, 1 in training: 2.5, 1.5, 0.5 of 4.5; position 1 sees 1, 2, 1: 0.5, 2.5, 1.5 of 4.5
    # test: position 0 holds 0 and 2, position 1 holds 1 and 2
    expected = -(math.log2(2.5 / 4.5) + math.log2(0.5 / 4.5) + math.log2(2.5 / 4.5) + math.log2(1.5 / 4.5)) / 4
    assert position_unigram_bits(TRAIN, TEST, 3) == pytest.approx(expected, rel=1e-12)
    refs = context_free_references(TRAIN, TEST, 3)
    assert refs == pytest.approx({"unigram_bits": unigram_bits(TRAIN, TEST, 3), "position_unigram_bits": expected},
                                 rel=1e-12)


def test_per_position_unigram_sees_what_the_unigram_cannot():
    """Codes fixed by position: per position they cost almost nothing, pooled they cost log2(positions)."""
    grids = np.tile(np.arange(4).reshape(1, 2, 2), (1000, 1, 1))
    refs = context_free_references(grids, grids[:10], 4)
    assert refs["unigram_bits"] == pytest.approx(math.log2(4), abs=1e-3)
    assert refs["position_unigram_bits"] == pytest.approx(-math.log2(1000.5 / 1002), rel=1e-9)


def test_train_prior_reports_the_references_and_the_ratio(tmp_path, capsys):
    rng = np.random.default_rng(0)
    data = tmp_path / "gray.npz"
    np.savez(data, x_train=rng.integers(0, 256, (40, 16, 16), dtype=np.uint8),
             x_test=rng.integers(0, 256, (12, 16, 16), dtype=np.uint8))
    tiny = ["--num-hiddens", "8", "--residual-hiddens", "4", "--residual-layers", "1", "--embedding-dim", "4",
            "--num-embeddings", "16", "--kernel", "numpy", "--no-progress"]
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--steps", "2", "--batch", "8",
                 *tiny]) == 0
    capsys.readouterr()
    assert main(["train-prior", str(tmp_path / "run" / "checkpoint.npz"), "--steps", "2", "--batch", "8",
                 "--channels", "4", "--layers", "1", "--kernel-size", "3", "--eval-size", "10",
                 "--no-progress"]) == 0
    final = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    [cache] = [f for f in os.listdir(tmp_path / "run") if f.startswith("codes-")]
    codes = load(str(tmp_path / "run" / cache))
    test = codes["test_codes"][:10]                 # the grids the NLL was measured on
    assert final["unigram_bits"] == pytest.approx(unigram_bits(codes["train_codes"], test, 16), rel=1e-12)
    assert final["position_unigram_bits"] == pytest.approx(position_unigram_bits(codes["train_codes"], test, 16),
                                                           rel=1e-12)
    assert final["nll_over_position_unigram"] == pytest.approx(final["nll_bits"] / final["position_unigram_bits"])
    with open(tmp_path / "run" / "prior" / "metrics.jsonl") as f:
        logged = [json.loads(line) for line in f][-1]
    assert logged["split"] == "test" and logged["position_unigram_bits"] == final["position_unigram_bits"]


# -- the test NLL

def test_prior_nll_bits_with_a_limit_counts_each_grid_once():
    """--eval-size not a multiple of the evaluation batch: the last batch stops at the limit."""
    from minivq.prior import prior_nll_bits
    mv.manual_seed(1)
    model = GatedPixelCNN(6, channels=4, num_layers=1, kernel_size=3, head_channels=5)
    codes = np.random.default_rng(1).integers(0, 6, (50, 3, 3))
    whole = prior_nll_bits(model, codes[:13], None)
    assert prior_nll_bits(model, codes, None, batch_size=4, limit=13) == pytest.approx(whole, rel=1e-6)
    per_grid = [prior_nll_bits(model, codes[i:i + 1], None) for i in range(13)]
    assert whole == pytest.approx(np.mean(per_grid), rel=1e-5)


# -- the PyTorch twin against minivq, on the same weights

def _twin():
    pytest.importorskip("torch")
    if BENCHMARKS not in sys.path:
        sys.path.insert(0, BENCHMARKS)
    import torch_pixelcnn
    return torch_pixelcnn


@pytest.mark.parametrize("num_classes", [None, 10])
def test_twin_has_minivqs_parameters_names_and_count(num_classes):
    twin = _twin()
    mv.manual_seed(0)
    ours = GatedPixelCNN(512, num_classes=num_classes)
    theirs = twin.GatedPixelCNN(512, num_classes=num_classes)
    assert [(n, tuple(p.shape)) for n, p in theirs.named_parameters()] == \
        [(n, p.shape) for n, p in ours.named_parameters()]
    if num_classes is None:      # the default prior of the issue: 0.34 M parameters
        assert round(sum(p.numel() for p in theirs.parameters()) / 1e6, 2) == 0.34
    with pytest.raises(ValueError, match="shape"):
        twin.load_minivq_state(twin.GatedPixelCNN(512, channels=16, num_classes=num_classes), ours.state_dict())
    with pytest.raises(ValueError, match="class_bias"):
        twin.load_minivq_state(twin.GatedPixelCNN(512, num_classes=None if num_classes else 3), ours.state_dict())


@pytest.mark.parametrize("num_classes", [None, 10])
def test_twin_forward_loss_and_gradients_equal_minivqs(num_classes):
    twin = _twin()
    import torch
    mv.manual_seed(1)
    ours = GatedPixelCNN(512, num_classes=num_classes)
    theirs = twin.build_like(ours)
    rng = np.random.default_rng(1)
    idx = rng.integers(0, 512, (6, 8, 8))
    lab = rng.integers(0, 10, 6) if num_classes else None
    logits = ours(idx, lab)
    t_logits = theirs(torch.from_numpy(idx), None if lab is None else torch.from_numpy(lab))
    np.testing.assert_allclose(logits.data, t_logits.detach().numpy(), rtol=1e-5, atol=1e-5)
    loss = ours.loss(idx, lab)
    t_loss = theirs.loss(torch.from_numpy(idx), None if lab is None else torch.from_numpy(lab))
    assert float(loss.item()) == pytest.approx(float(t_loss.detach()), rel=1e-6)
    loss.backward()
    t_loss.backward()
    grads = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        g = grads[name].grad.numpy()
        scale = np.abs(g).max()
        assert scale > 0 or name.endswith("class_bias.weight"), name
        np.testing.assert_allclose(p.grad, g, rtol=0, atol=1e-5 * max(scale, 1e-30), err_msg=name)


def test_twin_equals_minivq_in_float64_and_after_adam_steps():
    """In float64 the engines agree to rounding; three Adam steps on the same batches keep them together."""
    twin = _twin()
    import torch
    mv.manual_seed(2)
    ours = GatedPixelCNN(20, channels=6, num_layers=3, kernel_size=3, head_channels=10).double()
    theirs = twin.load_minivq_state(twin.GatedPixelCNN(20, channels=6, num_layers=3, kernel_size=3,
                                                       head_channels=10).double(), ours.state_dict())
    opt, t_opt = mv.optim.Adam(ours.parameters(), lr=1e-2), torch.optim.Adam(theirs.parameters(), lr=1e-2)
    rng = np.random.default_rng(2)
    for _ in range(3):
        idx = rng.integers(0, 20, (4, 5, 5))
        loss, t_loss = ours.loss(idx), theirs.loss(torch.from_numpy(idx))
        assert float(loss.item()) == pytest.approx(float(t_loss.detach()), rel=1e-12)
        opt.zero_grad()
        t_opt.zero_grad()
        loss.backward()
        t_loss.backward()
        opt.step()
        t_opt.step()
    state = twin.minivq_state(theirs)
    for name, value in ours.state_dict().items():
        np.testing.assert_allclose(value, state[name], rtol=1e-10, atol=1e-12, err_msg=name)


def test_prior_vs_torch_script_runs_and_checks(tmp_path, capsys):
    """benchmarks/prior_vs_torch.py end to end on a tiny VQ-VAE: JSON written, the engines' checks pass."""
    _twin()
    import subprocess
    rng = np.random.default_rng(3)
    data = tmp_path / "gray.npz"
    np.savez(data, x_train=rng.integers(0, 256, (80, 16, 16), dtype=np.uint8),
             x_test=rng.integers(0, 256, (12, 16, 16), dtype=np.uint8))
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--steps", "2", "--batch", "8",
                 "--num-hiddens", "8", "--residual-hiddens", "4", "--residual-layers", "1", "--embedding-dim", "4",
                 "--num-embeddings", "16", "--kernel", "numpy", "--no-progress"]) == 0
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, os.path.join(BENCHMARKS, "prior_vs_torch.py"),
                           str(tmp_path / "run" / "checkpoint.npz"), "--steps", "4", "--eval-every", "2",
                           "--eval-size", "5", "--same-init-steps", "2", "--batch", "8", "--threads", "1",
                           "--tolerance", "100", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert set(result["final"]) == {"minivq", "torch_own_init"}
    assert result["final"]["minivq"]["steps"] == 4 and result["same_init"]["steps"] == 2
    assert [row["step"] for row in result["eval_curve"]] == [2, 4]
    assert result["eval_curve"][0]["grids"] == 5 and result["eval_curve"][1]["grids"] == 12
    assert all(c["passed"] for c in result["checks"].values())
    assert result["same_init"]["loss_difference_nats"]["step_1"] < 1e-5
    assert abs(result["same_init"]["eval_nll_bits"]["minivq"] - result["same_init"]["eval_nll_bits"]["torch_same_init"]) < 1e-4
    assert result["references"]["position_unigram_bits"] > 0 and result["machine"]["cpu_model"]
