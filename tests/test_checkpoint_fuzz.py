"""Crafted and foreign checkpoint metadata through the CLI (issue 18, item 3).

Every field minivq reads from a checkpoint's meta record is checked against one schema
(``minivq.checkpoint.check_meta``) before anything is built: a missing key, a value of the
wrong type, or a size that would allocate terabytes or make ``sample`` run for hours ends
as one line on stderr and exit 2. The named cases of the issue first, then hypothesis:
random deletions and replacements anywhere in the record, through ``eval``, ``sample``,
``train --resume`` and ``train-prior``.
"""
import json
import os
import shutil
import time

import numpy as np
import pytest

import minivq as mv
from minivq.cli import main
from minivq.config import ModelConfig, TrainConfig

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st   # noqa: E402

TINY = ["--num-hiddens", "8", "--residual-hiddens", "4", "--residual-layers", "1", "--embedding-dim", "4",
        "--num-embeddings", "16", "--kernel", "numpy", "--no-progress"]
PRIOR = ["--steps", "1", "--batch", "8", "--channels", "4", "--layers", "1", "--kernel-size", "3", "--no-progress"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    rng = np.random.default_rng(0)
    np.savez(d / "gray.npz", x_train=rng.integers(0, 256, (24, 16, 16), dtype=np.uint8),
             x_test=rng.integers(0, 256, (8, 16, 16), dtype=np.uint8),
             y_train=rng.integers(0, 3, 24), y_test=rng.integers(0, 3, 8))
    assert main(["train", "--data", str(d / "gray.npz"), "--out", str(d / "run"), "--steps", "2", "--batch", "8",
                 *TINY]) == 0
    assert main(["train-prior", str(d / "run" / "checkpoint.npz"), *PRIOR, "--conditional"]) == 0
    return d


def _meta(path):
    return json.loads(str(mv.load(path)["meta"]))


def forge(src, dst, change):
    """Copy the checkpoint ``src`` to ``dst`` with ``change(meta)`` applied to its meta record."""
    state = mv.load(src)
    meta = json.loads(str(state["meta"]))
    change(meta)
    state["meta"] = np.array(json.dumps(meta))
    mv.save(state, dst)
    return str(dst)


class Command:
    """One CLI command run on a forged checkpoint, in a fresh folder."""

    def __init__(self, world, name):
        self.world, self.name = world, name
        self.kind = "prior" if name == "sample" else "vqvae"
        self.source = world / "run" / ("prior/checkpoint.npz" if name == "sample" else "checkpoint.npz")

    def argv(self, ckpt, folder):
        data = str(self.world / "gray.npz")
        if self.name == "eval":
            return ["eval", ckpt, "--data", data]
        if self.name == "sample":
            return ["sample", ckpt, "--n", "2", "--class", "1", "--out", str(folder / "s.png")]
        if self.name == "train-prior":
            return ["train-prior", ckpt, *PRIOR, "--data", data, "--out", str(folder / "prior")]
        return ["train", "--resume", "--out", str(folder), "--steps", "4", "--data", data, "--no-progress"]

    def run(self, folder, change, capsys):
        """(exit code, stderr) of the command on the checkpoint forged by ``change``."""
        folder.mkdir(parents=True)
        ckpt = forge(self.source, folder / "checkpoint.npz", change)
        code = main(self.argv(ckpt, folder))
        return code, capsys.readouterr().err


def check_outcome(code, err, what, trains):
    """Exit 0; or exit 2 with exactly one line and no traceback (3 for a run that diverges, where it trains)."""
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("wrote", "encoding"))]
    allowed = (0, 2, 3) if trains else (0, 2)
    assert code in allowed, f"{what}: exit {code}\n{err}"
    if code:
        assert len(lines) == 1 and "Traceback" not in err, f"{what}: exit {code}\n{err}"
        assert code == 2 or "non-finite" in lines[0], f"{what}: {err}"


# ---------------------------------------------------------------- the cases the issue names
def _delete(*path):
    def change(meta):
        for key in path[:-1]:
            meta = meta[key]
        del meta[path[-1]]
    return change


def _set(value, *path):
    def change(meta):
        for key in path[:-1]:
            meta = meta[key]
        meta[path[-1]] = value
    return change


NAMED = [
    ("eval", _delete("train"), "no 'train'"),
    ("eval", _delete("data_variance"), "no 'data_variance'"),
    ("eval", _delete("step"), "no 'step'"),
    ("eval", _delete("rng_state"), "no 'rng_state'"),
    ("eval", _set([1, 2], "train"), "'train' must be a JSON object"),
    ("eval", _set("fast", "train", "lr"), "'lr'"),
    ("eval", _set(0.0, "data_variance"), "data_variance"),
    ("eval", _set(float("nan"), "data_variance"), "data_variance"),
    ("eval", _set(200_000, "model", "num_hiddens"), "weights"),
    ("eval", _set(10 ** 9, "model", "num_embeddings"), "weights"),
    ("eval", _set(-3, "step"), "'step'"),
    ("eval", _set(2, "version"), "version"),
    ("eval", _set({"state": 1}, "rng_state"), "rng_state"),
    ("eval", _set(5, "model", "in_channels"), "in_channels"),
    ("train --resume", _set("float16", "train", "dtype"), "dtype"),
    ("train-prior", _set(200_000, "model", "num_hiddens"), "weights"),
    ("sample", _delete("latent_shape"), "no 'latent_shape'"),
    ("sample", _set([300, 300], "latent_shape"), "300 x 300"),
    ("sample", _set([0, 4], "latent_shape"), "latent_shape"),
    ("sample", _set(10 ** 6, "prior", "channels"), "weights"),
    ("sample", _set(10 ** 9, "prior", "num_classes"), "num_classes"),
    ("sample", _set(99, "prior", "num_embeddings"), "99 codes"),
    ("sample", _set(1, "prior", "bogus"), "bogus"),
    ("sample", _set(200_000, "vqvae", "num_hiddens"), "weights"),
    ("sample", _delete("train"), "no 'train'"),
]


@pytest.mark.parametrize("command, change, words", NAMED, ids=[f"{c}-{w}" for c, _, w in NAMED])
def test_named_forgeries_are_one_line_and_exit_2(world, tmp_path, capsys, command, change, words):
    start = time.perf_counter()
    code, err = Command(world, command.split()[0]).run(tmp_path / "case", change, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert words in err, err
    assert time.perf_counter() - start < 20        # refused before anything large is built or sampled


def test_a_forged_code_cache_is_refused(world, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(world / "run", run, ignore=shutil.ignore_patterns("prior", "codes-*"))
    ckpt = str(run / "checkpoint.npz")
    assert main(["train-prior", ckpt, *PRIOR]) == 0
    cache = [p for p in os.listdir(run) if p.startswith("codes-")]
    assert len(cache) == 1
    good = mv.load(run / cache[0])
    forgeries = {"no test grids": dict(good, test_codes=good["test_codes"][:0]),
                 "codes past K": dict(good, train_codes=good["train_codes"] + 16),
                 "labels that do not match": dict(good, train_labels=good["train_labels"][:3]),
                 "grids of another size": dict(good, test_codes=good["test_codes"][:, :2])}
    for name, codes in forgeries.items():
        mv.save(codes, run / cache[0])
        capsys.readouterr()
        code = main(["train-prior", ckpt, *PRIOR, "--out", str(tmp_path / name)])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1 and cache[0] in err, (name, err)


# ---------------------------------------------------------------- hypothesis
DELETE = object()
_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70),
                  st.sampled_from([0, 1, -1, 3, 16, 2 ** 31, 2 ** 63, 200_000, 10 ** 12]),
                  st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
                  st.lists(st.integers(-5, 400), max_size=3))
_value = st.recursive(_leaf, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                          max_size=3), max_leaves=6)
_MODEL = [f.name for f in ModelConfig.__dataclass_fields__.values()] + ["in_channels"]
_TRAIN = ["seed", "batch_size", "lr", "data", "dtype", "dataset", "conditional", "lr_anneal", "planned_steps"]
_PATHS = {
    "vqvae": [(k,) for k in ("format", "version", "step", "rng_state", "train", "model", "data_variance")]
    + [("model", k) for k in _MODEL] + [("train", k) for k in _TRAIN] + [("rng_state", "state"),
                                                                            ("rng_state", "bit_generator")],
    "prior": [(k,) for k in ("format", "version", "step", "rng_state", "train", "prior", "vqvae", "latent_shape",
                             "uniform_bits")]
    + [("prior", k) for k in ("num_embeddings", "channels", "num_layers", "kernel_size", "head_channels",
                              "num_classes")]
    + [("vqvae", k) for k in _MODEL] + [("train", k) for k in _TRAIN],
}
assert set(TrainConfig.FROM_CHECKPOINT) <= set(_TRAIN)


def _mutations(kind):
    return st.lists(st.tuples(st.sampled_from(_PATHS[kind]), st.one_of(st.just(DELETE), _value)),
                    min_size=1, max_size=3)


def _apply(mutations):
    def change(meta):
        for path, value in mutations:
            record = meta
            for key in path[:-1]:
                record = record.get(key) if isinstance(record, dict) else None
            if not isinstance(record, dict):
                continue
            if value is DELETE:
                record.pop(path[-1], None)
            else:
                record[path[-1]] = value
    return change


def _fuzz(world, tmp_path_factory, capsys, name, mutations):
    folder = tmp_path_factory.mktemp("case")
    code, err = Command(world, name).run(folder / "c", _apply(mutations), capsys)
    check_outcome(code, err, f"minivq {name} with {mutations}", trains=name in ("train", "train-prior"))


FUZZ = settings(max_examples=12, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.mark.parametrize("name", ["eval", "train", "train-prior"])
@FUZZ
@given(mutations=_mutations("vqvae"))
def test_fuzzed_vqvae_metadata_is_exit_0_or_one_line(world, tmp_path_factory, capsys, name, mutations):
    _fuzz(world, tmp_path_factory, capsys, name, mutations)


@FUZZ
@given(mutations=_mutations("prior"))
def test_fuzzed_prior_metadata_is_exit_0_or_one_line(world, tmp_path_factory, capsys, mutations):
    _fuzz(world, tmp_path_factory, capsys, "sample", mutations)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["eval", "train", "train-prior", "sample"])
@settings(max_examples=150, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_fuzzed_metadata_long(world, tmp_path_factory, capsys, name, data):
    mutations = data.draw(_mutations("prior" if name == "sample" else "vqvae"))
    _fuzz(world, tmp_path_factory, capsys, name, mutations)
