"""Training end to end on a tiny synthetic dataset: logs, checkpoints, exact resume, the prior, sampling."""
import json
import os

import numpy as np
import pytest

import minivq as mv
from minivq.checkpoint import read_checkpoint
from minivq.cli import main

from conftest import read_log, write_blobs

TINY = ["--num-hiddens", "8", "--residual-hiddens", "4", "--residual-layers", "1", "--embedding-dim", "4",
        "--num-embeddings", "16"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return write_blobs(tmp_path_factory.mktemp("data") / "blobs.npz", 96, 40)


def train(tiny_data, out, steps, *extra):
    args = ["train", "--data", tiny_data, "--out", str(out), "--steps", str(steps), "--batch", "16",
            "--log-every", "1", "--checkpoint-every", "3", "--eval-every", "4", "--no-progress", *TINY, *extra]
    return main(args)


def test_train_writes_log_checkpoint_and_png(tiny_data, tmp_path, capsys):
    assert train(tiny_data, tmp_path, 5) == 0
    final = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"mse", "nmse", "perplexity", "codes_used"} <= set(final)
    log = read_log(tmp_path)
    train_recs = [r for r in log if r["split"] == "train"]
    assert [r["step"] for r in train_recs] == [1, 2, 3, 4, 5]
    for key in ("loss", "recon_error", "nmse", "perplexity", "codes_used", "seconds"):
        assert key in train_recs[0]
    assert any(r["split"] == "test" and r["step"] == 4 for r in log)
    png = (tmp_path / "reconstructions.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    meta, sections = read_checkpoint(str(tmp_path / "checkpoint.npz"), "minivq-vqvae")
    assert meta["step"] == 5 and "encoder.conv_1.weight" in sections["model"]


@pytest.mark.parametrize("extra", [["--paper-quantizer"], ["--paper-quantizer", "--ema"], []],
                         ids=["paper", "ema", "default"])
def test_resume_reproduces_an_uninterrupted_run(tiny_data, tmp_path, extra):
    """The paper's quantiser, its EMA codebook, and the default (EMA, cosine lookup in 8 dims, dead codes
    re-seeded from the batch by the seeded generator): resumed at step 3, bit for bit the uninterrupted run."""
    assert train(tiny_data, tmp_path / "full", 7, *extra) == 0
    assert train(tiny_data, tmp_path / "part", 3, "--plan-steps", "7", *extra) == 0   # the plan is recorded
    assert train(tiny_data, tmp_path / "part", 7, "--resume") == 0
    full = [(r["step"], r["loss"]) for r in read_log(tmp_path / "full") if r["split"] == "train"]
    part = [(r["step"], r["loss"]) for r in read_log(tmp_path / "part") if r["split"] == "train"]
    assert part == full
    a = mv.load(tmp_path / "full" / "checkpoint.npz")
    b = mv.load(tmp_path / "part" / "checkpoint.npz")
    for key in a:
        if key != "meta":
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_the_learning_rate_follows_the_plan_and_a_resume_keeps_it(tiny_data, tmp_path, capsys):
    """Each step's rate is annealed_lr(--lr, step, plan, --lr-anneal) and logged; the plan (default --steps)
    is recorded, kept on resume, refused where the run would pass its end, and changed only when asked."""
    assert train(tiny_data, tmp_path / "run", 4, "--plan-steps", "8") == 0
    assert train(tiny_data, tmp_path / "run", 8, "--resume") == 0
    rates = [r["lr"] for r in read_log(tmp_path / "run") if r["split"] == "train"]
    assert rates == [mv.optim.annealed_lr(1e-3, t, 8, 0.25) for t in range(1, 9)]
    assert rates[5] == 1e-3 and 0 < rates[6] < 1e-3 and rates[7] == pytest.approx(0.0, abs=1e-18)
    meta, _ = read_checkpoint(str(tmp_path / "run" / "checkpoint.npz"), "minivq-vqvae")
    assert meta["train"]["planned_steps"] == 8 and meta["train"]["lr_anneal"] == 0.25
    capsys.readouterr()
    assert train(tiny_data, tmp_path / "run", 9, "--resume") == 2          # past the plan: refused, one line
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "planned for 8 steps" in err and "--plan-steps 9" in err
    assert train(tiny_data, tmp_path / "run", 9, "--resume", "--plan-steps", "12") == 0     # planned again
    (last,) = [r["lr"] for r in read_log(tmp_path / "run") if r["split"] == "train" and r["step"] == 9]
    assert last == 1e-3 == mv.optim.annealed_lr(1e-3, 9, 12, 0.25)
    # --lr-anneal 0: the constant rate of the paper (and of every run before the schedule existed)
    assert train(tiny_data, tmp_path / "flat", 3, "--lr-anneal", "0", "--lr", "2e-3") == 0
    assert [r["lr"] for r in read_log(tmp_path / "flat") if r["split"] == "train"] == [2e-3] * 3


def test_a_checkpoint_from_before_the_schedule_resumes_at_its_constant_rate(tiny_data, tmp_path):
    from test_checkpoint_fuzz import forge
    assert train(tiny_data, tmp_path / "old", 2, "--lr-anneal", "0") == 0
    ckpt = tmp_path / "old" / "checkpoint.npz"

    def as_before(meta):
        del meta["train"]["lr_anneal"], meta["train"]["planned_steps"]
    forge(ckpt, ckpt, as_before)
    assert train(tiny_data, tmp_path / "old", 5, "--resume") == 0          # no plan to pass: constant
    assert [r["lr"] for r in read_log(tmp_path / "old") if r["split"] == "train"] == [1e-3] * 5


def test_a_fresh_run_centres_the_output_on_its_first_batch_and_a_resumed_one_does_not(tiny_data, tmp_path,
                                                                                       monkeypatch):
    calls = []
    original = mv.models.VQVAE.center_output

    def spy(model, x):
        calls.append((x.shape, model.training))
        return original(model, x)
    monkeypatch.setattr(mv.models.VQVAE, "center_output", spy)
    assert train(tiny_data, tmp_path / "run", 2, "--plan-steps", "3") == 0
    assert [(shape[:2], training) for shape, training in calls] == [((16, 1), True)]     # one batch of images
    assert train(tiny_data, tmp_path / "run", 3, "--resume") == 0
    assert len(calls) == 1
    assert train(tiny_data, tmp_path / "off", 2, "--no-center-output") == 0
    assert len(calls) == 1
    meta, _ = read_checkpoint(str(tmp_path / "off" / "checkpoint.npz"), "minivq-vqvae")
    assert meta["train"]["center_output"] is False


def test_eval_and_reconstruct_commands(tiny_data, tmp_path, capsys):
    assert train(tiny_data, tmp_path, 2) == 0
    capsys.readouterr()
    ckpt = str(tmp_path / "checkpoint.npz")
    assert main(["eval", ckpt]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["step"] == 2 and metrics["images"] == 40
    out = tmp_path / "recon.png"
    assert main(["reconstruct", ckpt, "--out", str(out), "--n", "8"]) == 0
    assert out.read_bytes().startswith(b"\x89PNG")


def test_prior_train_resume_and_sample(tiny_data, tmp_path, capsys):
    assert train(tiny_data, tmp_path, 2) == 0
    ckpt = str(tmp_path / "checkpoint.npz")
    prior_args = ["train-prior", ckpt, "--steps", "4", "--batch", "8", "--channels", "4", "--layers", "2",
                  "--kernel-size", "3", "--log-every", "1", "--eval-every", "2", "--checkpoint-every", "2",
                  "--no-progress", "--conditional"]
    assert main(prior_args) == 0
    final = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert final["uniform_bits"] == pytest.approx(4.0) and final["nll_bits"] > 0
    caches = [p for p in os.listdir(tmp_path) if p.startswith("codes-")]
    assert len(caches) == 1
    # resume from step 2 reproduces the uninterrupted losses
    full = [r["loss"] for r in read_log(tmp_path / "prior") if r["split"] == "train"]
    resumed_dir = tmp_path / "prior2"
    assert main(prior_args[:3] + ["2"] + prior_args[4:] + ["--out", str(resumed_dir)]) == 0
    assert main(prior_args + ["--out", str(resumed_dir), "--resume"]) == 0
    resumed = [r["loss"] for r in read_log(resumed_dir) if r["split"] == "train"]
    assert resumed == full
    prior_ckpt = str(tmp_path / "prior" / "checkpoint.npz")
    png1, png2 = tmp_path / "s1.png", tmp_path / "s2.png"
    assert main(["sample", prior_ckpt, "--n", "4", "--class", "1", "--seed", "3", "--out", str(png1)]) == 0
    assert main(["sample", prior_ckpt, "--n", "4", "--class", "1", "--seed", "3", "--out", str(png2)]) == 0
    assert png1.read_bytes() == png2.read_bytes()
    capsys.readouterr()
    assert main(["sample", prior_ckpt, "--out", str(png1)]) == 2
    assert "class-conditional" in capsys.readouterr().err


def test_nonfinite_loss_stops_or_is_skipped(tiny_data, tmp_path, capsys, monkeypatch):
    from minivq import functional as F
    real = F.mse_loss
    calls = {"n": 0}

    def flaky(a, b):      # the reconstruction loss of step 4 turns into NaN
        out = real(a, b)
        calls["n"] += 1
        if calls["n"] == 4 and mv.is_grad_enabled():
            out = out * np.float32("nan")
        return out

    monkeypatch.setattr(F, "mse_loss", flaky)
    assert train(tiny_data, tmp_path / "a", 6) == 3
    err = capsys.readouterr().err
    assert "step 4" in err and "non-finite" in err and len(err.strip().splitlines()) == 1
    meta, _ = read_checkpoint(str(tmp_path / "a" / "checkpoint.npz"), "minivq-vqvae")
    assert meta["step"] == 3          # the last good checkpoint is kept
    calls["n"] = 0
    assert train(tiny_data, tmp_path / "b", 6, "--skip-nonfinite") == 0
    log = [r for r in read_log(tmp_path / "b") if r["split"] == "train"]
    assert log[-1]["skipped_nonfinite"] == 1


def test_compare_runs_script_reports_each_run_and_what_differs(tiny_data, tmp_path, capsys):
    """benchmarks/compare_runs.py (behind the README's quantiser-variant table) on two tiny runs."""
    import subprocess
    import sys
    plain, ema = tmp_path / "plain", tmp_path / "ema"
    assert train(tiny_data, plain, 4, "--paper-quantizer") == 0
    assert train(tiny_data, ema, 4, "--paper-quantizer", "--ema") == 0
    capsys.readouterr()
    script = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "compare_runs.py")
    out = tmp_path / "runs.json"
    done = subprocess.run([sys.executable, script, str(plain), str(ema), "--out", str(out)],
                          capture_output=True, text=True, check=True)
    result = json.loads(out.read_text())
    assert result["differing_options"] == ["model.decay"]
    finals = {os.path.basename(r["folder"]): r["test"][-1] for r in result["runs"]}
    assert finals["plain"] == {k: v for k, v in read_log(plain)[-1].items() if k in finals["plain"]}
    assert finals["ema"]["step"] == 4 and "model.decay=0.99" in done.stdout


# ---------------------------------------------------------------- the quantiser's flags
PAPER_OPTIONS = dict(decay=0.0, kmeans_init=False, estimator="straight_through", dead_code_threshold=0.0,
                     max_replacements=64, lookup="l2", lookup_dim=None, simvq=False, levels=None)


def model_record(folder):
    meta, _ = read_checkpoint(str(folder / "checkpoint.npz"), "minivq-vqvae")
    return meta["model"]


def test_no_flags_train_the_default_quantizer(tiny_data, tmp_path):
    assert train(tiny_data, tmp_path, 2) == 0
    model = model_record(tmp_path)
    assert (model["decay"], model["lookup"], model["lookup_dim"], model["dead_code_threshold"]) == \
        (0.99, "cosine", 8, 1.0)
    assert not model["kmeans_init"] and not model["simvq"] and model["levels"] is None
    assert model["estimator"] == "straight_through" and model["max_replacements"] == 64
    assert "codes_replaced" in [r for r in read_log(tmp_path) if r["split"] == "train"][0]
    state = mv.load(tmp_path / "checkpoint.npz")
    assert state["model.vq.codebook"].shape == (16, 8) and "model.vq.usage" in state      # EMA, in 8 dims


def test_paper_quantizer_turns_every_option_off_and_explicit_flags_still_apply(tiny_data, tmp_path):
    assert train(tiny_data, tmp_path / "paper", 2, "--paper-quantizer") == 0
    model = model_record(tmp_path / "paper")
    assert {k: model[k] for k in PAPER_OPTIONS} == PAPER_OPTIONS
    state = mv.load(tmp_path / "paper" / "checkpoint.npz")
    assert state["model.vq.codebook"].shape == (16, 4) and not [k for k in state if "project" in k]
    assert "codes_replaced" not in [r for r in read_log(tmp_path / "paper") if r["split"] == "train"][0]
    assert train(tiny_data, tmp_path / "dead", 2, "--paper-quantizer", "--dead-code-threshold", "2") == 0
    model = model_record(tmp_path / "dead")
    assert {k: model[k] for k in PAPER_OPTIONS} == dict(PAPER_OPTIONS, dead_code_threshold=2.0)
    assert train(tiny_data, tmp_path / "ema", 2, "--paper-quantizer", "--ema") == 0
    assert {k: model_record(tmp_path / "ema")[k] for k in PAPER_OPTIONS} == dict(PAPER_OPTIONS, decay=0.99)
    # --ema alone keeps the default quantiser (its decay is the default's); --lookup-dim 0: no projection
    assert train(tiny_data, tmp_path / "ema-default", 2, "--ema", "--lookup-dim", "0") == 0
    model = model_record(tmp_path / "ema-default")
    assert (model["decay"], model["lookup"], model["lookup_dim"], model["dead_code_threshold"]) == \
        (0.99, "cosine", None, 1.0)


def test_levels_and_simvq_start_from_the_papers_options(tiny_data, tmp_path, capsys):
    """FSQ and SimVQ take no EMA codebook: --levels and --simvq train without a word about the default's options."""
    assert train(tiny_data, tmp_path / "fsq", 2, "--plan-steps", "3", "--levels", "2,2,4", "--num-embeddings", "16") == 0
    assert "error" not in capsys.readouterr().err
    model = model_record(tmp_path / "fsq")
    assert {k: model[k] for k in PAPER_OPTIONS} == dict(PAPER_OPTIONS, levels=[2, 2, 4])
    assert train(tiny_data, tmp_path / "fsq", 3, "--resume", "--levels", "2,2,4") == 0     # the same setting
    assert train(tiny_data, tmp_path / "simvq", 2, "--simvq") == 0
    assert {k: model_record(tmp_path / "simvq")[k] for k in PAPER_OPTIONS} == dict(PAPER_OPTIONS, simvq=True)


def test_restart_after_is_one_line_pointing_to_dead_code_threshold(tiny_data, tmp_path, capsys):
    assert train(tiny_data, tmp_path, 2, "--restart-after", "3") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("minivq train: error:") and "--dead-code-threshold" in err[0], err
    assert not (tmp_path / "checkpoint.npz").exists()
