"""The run configuration: one source for every default, shared by the CLI, the trainers and the checkpoints."""
import ast
import dataclasses
import inspect
import pathlib

import pytest

from minivq import config
from minivq.cli import build_parser
from minivq.config import ModelConfig, PriorConfig, TrainConfig
from minivq.models import DEFAULT_QUANTIZER, PAPER_QUANTIZER, GatedPixelCNN, QuantizerOptions, VQVAE

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _subparser(name):
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return action.choices[name]


def test_model_config_is_vqvae_signature():
    """Every ModelConfig field is a VQVAE argument or a QuantizerOptions field with VQVAE's default (for the
    quantiser's options: DEFAULT_QUANTIZER's), and the reverse (but for what the trainer decides: the image
    channels and the kernel; and the grouped ``quantizer``, whose fields ModelConfig holds flat)."""
    params = {k: p.default for k, p in inspect.signature(VQVAE.__init__).parameters.items() if k != "self"}
    options = {f.name for f in dataclasses.fields(QuantizerOptions)}
    fields = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    assert set(params) - set(fields) == {"in_channels", "kernel", "quantizer"}
    assert params["quantizer"] is DEFAULT_QUANTIZER
    assert set(fields) == (set(params) | options) - {"in_channels", "kernel", "quantizer"}
    assert not options & set(params)
    for name, default in fields.items():
        expected = getattr(DEFAULT_QUANTIZER, name) if name in options else params[name]
        assert expected == default, name


def test_model_config_builds_what_it_says():
    """build() hands the flat options to VQVAE grouped; paper() is the paper's model, changes on top."""
    small = dict(num_hiddens=8, num_residual_hiddens=4, num_residual_layers=1, embedding_dim=4, num_embeddings=8)
    model = ModelConfig(**small).build(in_channels=1)
    assert model.config == dict(VQVAE(in_channels=1, **small).config)
    assert model.config["decay"] == 0.99 and model.config["lookup"] == "cosine"
    assert model.config["lookup_dim"] == 8 and model.config["dead_code_threshold"] == 1.0
    paper = ModelConfig.paper(**small)
    assert paper.decay == 0.0
    assert {k: getattr(paper, k) for k in config.QUANTIZER_OPTIONS} == dataclasses.asdict(PAPER_QUANTIZER)
    assert paper.build(in_channels=1).config == VQVAE(in_channels=1, decay=0.0, quantizer=PAPER_QUANTIZER,
                                                      **small).config
    assert ModelConfig.paper(decay=0.99).decay == 0.99          # a change of the decay, too, applies on top
    assert ModelConfig.paper(dead_code_threshold=2.0).dead_code_threshold == 2.0


def test_prior_config_reads_the_pixelcnn_defaults():
    params = inspect.signature(GatedPixelCNN.__init__).parameters
    for name in ("channels", "num_layers", "kernel_size", "head_channels"):
        assert getattr(PriorConfig(), name) == params[name].default, name


@pytest.mark.parametrize("command,cls", [("train", TrainConfig), ("train", ModelConfig),
                                         ("train-prior", PriorConfig)])
def test_every_flag_comes_from_the_config_with_its_default_in_the_help(command, cls):
    sub = _subparser(command)
    by_flag = {s: a for a in sub._actions for s in a.option_strings}
    flagged = config.cli_fields(cls)
    assert flagged, "no command-line fields found"
    for f in flagged:
        action = by_flag[f.metadata["flag"]]
        assert action.dest == f.name
        assert action.default is None          # "not given": the config's default applies
        if f.type is not bool and f.default is not None:
            assert f"(default: {f.default})" in action.help, (f.name, action.help)


def test_unset_flags_give_the_config_defaults():
    from minivq.cli import _model_choices, _train_config
    args = build_parser().parse_args(["train"])
    assert _train_config(args) == TrainConfig()
    assert ModelConfig.from_dict(_model_choices(args)) == ModelConfig()
    args = build_parser().parse_args(["train", "--ema", "--steps", "7", "--no-progress"])
    assert _train_config(args) == TrainConfig(steps=7, progress=False)
    assert _model_choices(args) == {"decay": 0.99}


@pytest.mark.parametrize("cls,changes,needle", [
    (TrainConfig, dict(steps=0), "--steps must be a positive integer"),
    (TrainConfig, dict(lr=float("nan")), "--lr must be a positive finite number"),
    (TrainConfig, dict(batch_size=True), "--batch must be a positive integer"),
    (TrainConfig, dict(dtype="float16"), "float16"),
    (TrainConfig, dict(kernel="fast"), "unknown kernel 'fast'"),
    (TrainConfig, dict(comm_backend="tcp"), "unknown comm 'tcp'"),
    (ModelConfig, dict(decay=1.0), "--decay must lie in [0, 1)"),
    (ModelConfig, dict(decay=float("nan")), "--decay must be a finite number"),
    (ModelConfig, dict(commitment_cost=-1.0), "--commitment-cost"),
    (ModelConfig, dict(estimator="magic"), "unknown estimator 'magic'"),
    (ModelConfig, dict(levels="8,x"), "--levels takes integers"),
    (PriorConfig, dict(eval_every=-5), "--eval-every must be a positive integer"),
])
def test_bad_values_are_refused_naming_the_flag(cls, changes, needle):
    with pytest.raises(ValueError) as info:
        cls(**changes)
    assert needle in str(info.value)


def test_levels_read_from_text_and_json():
    assert ModelConfig(levels="8,8,8", num_embeddings=512).levels == (8, 8, 8)
    assert ModelConfig.from_dict({"levels": [5, 5], "num_embeddings": 25}).levels == (5, 5)


def test_an_older_checkpoint_gets_the_options_it_was_trained_with_not_todays_defaults():
    old = {"model": {"num_hiddens": 8, "num_residual_hiddens": 4, "num_residual_layers": 1, "embedding_dim": 4,
                     "num_embeddings": 16, "commitment_cost": 0.25, "decay": 0.0, "in_channels": 1},
           "train": {"seed": 0, "batch_size": 8, "lr": 1e-3, "kmeans_init": True, "estimator": "rotation",
                     "restart_after": 5}}
    got = ModelConfig.from_checkpoint(old)
    assert got.kmeans_init is True and got.estimator == "rotation"
    for name, value in config._BEFORE_OPTION.items():
        if name not in ("kmeans_init", "estimator"):
            assert getattr(got, name) == value, name


def _functions(tree):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def test_no_function_takes_more_than_twelve_parameters_and_no_module_is_over_600_lines():
    files = sorted((ROOT / "minivq").rglob("*.py")) + sorted((ROOT / "kernels").rglob("*.py"))
    assert len(files) > 20
    too_many, too_long = [], []
    for path in files:
        text = path.read_text()
        if len(text.splitlines()) > 600:
            too_long.append(f"{path.relative_to(ROOT)}: {len(text.splitlines())} lines")
        for fn in _functions(ast.parse(text)):
            a = fn.args
            names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
            count = len(names) + bool(a.vararg) + bool(a.kwarg) - (names[:1] in (["self"], ["cls"]))
            if count > 12:
                too_many.append(f"{path.relative_to(ROOT)}:{fn.lineno} {fn.name} takes {count}")
    assert not too_many and not too_long, too_many + too_long
