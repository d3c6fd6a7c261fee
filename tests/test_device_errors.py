"""Asking for the GPU where CuPy is missing: one line that names the fix, on every path to the device.

CuPy's absence is simulated (minivq.backend remembers why importing it failed), so these run the
same on every machine. Already covered elsewhere: ``mv.tensor(x, device="cuda")`` (test_backend.py)
and ``minivq train --device cuda`` (test_cli_errors.py) on machines without CuPy; unknown device
names (test_backend.py, test_cli_errors.py).
"""
import numpy as np
import pytest

import minivq as mv
from minivq import backend
from minivq.cli import main
from minivq.data import Dataset

FIX = "pip install -e .[cuda]"
TINY = ["--num-hiddens", "8", "--residual-hiddens", "4", "--residual-layers", "1", "--embedding-dim", "4",
        "--num-embeddings", "16"]


@pytest.fixture
def no_cupy(monkeypatch):
    """minivq as it is where ``import cupy`` fails."""
    monkeypatch.setattr(backend, "_cupy", None)
    monkeypatch.setattr(backend, "_cupy_error", "ModuleNotFoundError: No module named 'cupy'")


def one_line(exc_info):
    message = str(exc_info.value)
    assert "\n" not in message
    assert FIX in message and "--device cpu" in message and "No module named 'cupy'" in message, message
    return message


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:3", "GPU"])
def test_every_way_to_the_device_names_the_fix(no_cupy, device):
    x = np.arange(6.0).reshape(2, 3)
    attempts = {
        "mv.tensor": lambda: mv.tensor(x, device=device),
        "Tensor.to": lambda: mv.tensor(x, requires_grad=True).to(device),
        "backend.to_device": lambda: backend.to_device(x, device),
        "Dataset.batch": lambda: Dataset.from_arrays(np.zeros((3, 1, 4, 4), np.uint8)).batch(
            np.arange(2), device=device),
    }
    for what, attempt in attempts.items():
        with pytest.raises(RuntimeError) as info:
            attempt()
        one_line(info)
    assert not backend.cuda_available()


def test_model_to_cuda_names_the_fix_and_leaves_the_model_usable(no_cupy):
    mv.manual_seed(0)
    model = mv.models.VQVAE(in_channels=1, num_hiddens=8, num_residual_hiddens=4, num_residual_layers=1,
                            embedding_dim=4, num_embeddings=8, decay=0.9, kernel="numpy")
    before = {k: backend.to_numpy(v).copy() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError) as info:
        model.to("cuda")
    one_line(info)
    for key, value in model.state_dict().items():       # nothing moved, nothing lost
        assert backend.array_device(value) == "cpu", key
        np.testing.assert_array_equal(value, before[key])
    x_recon, _ = model(mv.tensor(np.zeros((1, 1, 8, 8), np.float32)))
    assert x_recon.shape == (1, 1, 8, 8)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A VQ-VAE checkpoint and a prior checkpoint trained on the CPU, one step each."""
    folder = tmp_path_factory.mktemp("device-errors")
    rng = np.random.default_rng(0)
    data = folder / "tiny.npz"
    np.savez(data, x_train=rng.integers(0, 256, (16, 8, 8), dtype=np.uint8),
             x_test=rng.integers(0, 256, (8, 8, 8), dtype=np.uint8))
    assert main(["train", "--data", str(data), "--out", str(folder / "run"), "--steps", "1", "--batch", "8",
                 "--no-progress", *TINY]) == 0
    vqvae = folder / "run" / "checkpoint.npz"
    assert main(["train-prior", str(vqvae), "--steps", "1", "--batch", "8", "--channels", "4", "--layers", "1",
                 "--kernel-size", "3", "--no-progress"]) == 0
    return data, vqvae, folder / "run" / "prior" / "checkpoint.npz"


def test_every_command_on_cuda_is_one_line_and_writes_nothing(no_cupy, checkpoints, tmp_path, capsys):
    data, vqvae, prior = checkpoints
    capsys.readouterr()
    commands = {
        "train": ["train", "--data", str(data), "--out", str(tmp_path / "t"), "--steps", "1", "--batch", "8",
                  "--no-progress", *TINY],
        "eval": ["eval", str(vqvae)],
        "reconstruct": ["reconstruct", str(vqvae), "--out", str(tmp_path / "r.png")],
        "train-prior": ["train-prior", str(vqvae), "--out", str(tmp_path / "p"), "--steps", "1", "--no-progress"],
        "sample": ["sample", str(prior), "--out", str(tmp_path / "s.png")],
    }
    for name, argv in commands.items():
        for device in ("cuda", "cuda:1"):
            assert main(argv + ["--device", device]) == 2, name
            err = capsys.readouterr().err
            lines = [line for line in err.splitlines() if line.strip()]
            assert len(lines) == 1 and "Traceback" not in err, (name, err)
            assert lines[0].startswith(f"minivq {name}: error: ") and FIX in lines[0], lines[0]
    assert list(tmp_path.iterdir()) == []          # no folder made, no file written
