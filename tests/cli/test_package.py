"""The command line as a package: light imports, one error line for user errors, help from the registry,
and your own model through ``--model package.module:factory``."""

import dataclasses
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qrobust.cli import app, options, quantize, search, smoothing_options, train
from qrobust.quant import load_int8, save_int8

ROOT = Path(__file__).resolve().parents[2]
HEAVY = (
    "torch",
    "numpy",
    "scipy",
    "matplotlib",
    *(
        f"qrobust.{name}"
        for name in ("attacks", "bounds", "data", "jobs", "models", "quant", "search", "smoothing", "train")
    ),
)


def heavy_modules_after(*args: str) -> list[str]:
    """The heavy modules a fresh ``qrobust ARGS`` process has imported when it exits."""
    code = (
        "import json, sys\nfrom qrobust.cli import main\nsys.argv = ['qrobust', *sys.argv[1:]]\ntry:\n    main()\n"
        f"except SystemExit:\n    print(json.dumps([m for m in {list(HEAVY)!r} if m in sys.modules]))"
    )
    finished = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    return json.loads(finished.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "args",
    [
        ("--help",),
        ("certify", "--help"),
        ("train", "--help"),
        ("certify", "x", "--sigma", "-1", "--output", "y"),
        ("predict", "x", "--sigma", "0.5", "--alpha", "2", "--output", "y"),
    ],
)
def test_help_and_argument_errors_import_no_torch(args):
    assert heavy_modules_after(*args) == []


def test_help_lists_every_registered_model(run):
    from qrobust.data import DATASET_NAMES
    from qrobust.models.registry import _BUILTINS

    assert options.MODEL_NAMES == tuple(_BUILTINS) and options.DATASET_NAMES == DATASET_NAMES
    code, out, _ = run("train", "--help")
    assert code == 0
    flat = " ".join(out.replace("│", " ").split())
    assert all(name in flat for name in ("resnet8", "enresnet110", "mobilenetv2", "package.module:function", "npz:DIR"))


def test_help_defaults_match_the_library():
    from qrobust.quant import LowBitConfig
    from qrobust.quant.admm import ADMMConfig
    from qrobust.quant.lowbit import MAX_BITS
    from qrobust.search import SearchConfig
    from qrobust.search.arq import DEFAULT_WARMUP
    from qrobust.smoothing import DEFAULT_RADII

    assert options.DEFAULT_RADII == ",".join(f"{r:g}" for r in DEFAULT_RADII)
    assert (train.MAX_BITS, train.RHO, train.CUTOFF_EPOCH) == (MAX_BITS, LowBitConfig.rho, LowBitConfig.cutoff_epoch)
    assert (quantize.ADMM_ITERATIONS, quantize.ADMM_STEPS) == (ADMMConfig.iterations, ADMMConfig.steps)
    defaults = {f.name: f.default for f in dataclasses.fields(SearchConfig)}
    parameters = inspect.signature(search.search_command).parameters
    for name in (
        "episodes",
        "reward",
        "reward_radius",
        "certifier",
        "finetune_images",
        "finetune_lr",
        "validation_images",
        "n0",
        "n",
        "n_zeta",
        "alpha",
        "alpha_zeta",
        "gamma",
        "batch_size",
    ):
        assert parameters[name].default == defaults[name], name
    assert parameters["warmup"].default == DEFAULT_WARMUP


def test_certify_and_predict_share_one_declaration_of_their_options():
    commands = {info.name: info.callback for info in app.registered_commands}
    shared = [field.name for field in dataclasses.fields(smoothing_options.SmoothingOptions)]
    for name in ("certify", "predict"):
        parameters = list(inspect.signature(commands[name]).parameters)
        assert parameters[:3] == shared[:3] and parameters[-len(shared) + 3 :] == shared[3:]


def test_modules_stay_small():
    sizes = {path.name: len(path.read_text().splitlines()) for path in (ROOT / "src/qrobust/cli").glob("*.py")}
    assert max(sizes.values()) <= 200, sizes


def test_an_int8_file_without_metadata_is_one_line(run, checkpoint, tmp_path):
    int8 = tmp_path / "m.int8.pt"
    assert run("quantize", checkpoint, "--calibration-images", 64, "--output", int8)[0] == 0
    bare = tmp_path / "bare.int8.pt"
    save_int8(bare, load_int8(int8).model)  # from Python, without metadata
    code, out, err = run(
        "certify",
        bare,
        "--method",
        "int",
        "--sigma",
        0.25,
        "--n",
        100,
        "--num-examples",
        2,
        "--output",
        tmp_path / "c.tsv",
    )
    assert code == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1
    assert "no 'dataset' in its metadata" in err and "Traceback" not in out + err


def test_a_checkpoint_of_an_unknown_factory_is_one_line_and_imports_nothing(run, checkpoint, tmp_path):
    from qrobust.models.checkpoint import load_checkpoint, save_checkpoint

    crafted = load_checkpoint(checkpoint)
    crafted.metadata["model"] = "qrobust_never_imported:factory"
    save_checkpoint(tmp_path / "crafted.pt", crafted)
    code, _, err = run("certify", tmp_path / "crafted.pt", "--sigma", 0.25, "--n", 100, "--output", tmp_path / "c.tsv")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "'qrobust_never_imported:factory' is not registered: pass --model qrobust_never_imported:factory" in err
    assert "qrobust_never_imported" not in sys.modules


def test_a_model_factory_that_cannot_be_imported_is_one_line(run, tmp_path):
    for spec, message in (
        ("no_such_module:f", "cannot import 'no_such_module'"),
        ("os:not_there", "has no 'not_there'"),
        ("no-colon", "unknown model 'no-colon'"),
    ):
        code, _, err = run(
            "train", "--model", spec, "--dataset", "digits", "--epochs", 1, "--output", tmp_path / "m.pt"
        )
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_your_own_model_on_the_command_line(tmp_path):
    """examples/custom_model_cli.sh on a tiny budget; its checkpoint does not load without --model."""
    env = os.environ | {"PYTHON": sys.executable}
    finished = subprocess.run(
        ["sh", str(ROOT / "examples/custom_model_cli.sh"), str(tmp_path), "1", "20"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert finished.returncode == 0, finished.stderr
    assert len((tmp_path / "certify.tsv").read_text().splitlines()) == 21
    assert "certified accuracy at radius 0" in finished.stdout
    again = [
        sys.executable,
        "-m",
        "qrobust",
        "certify",
        str(tmp_path / "my_cnn.pt"),
        "--sigma",
        "0.25",
        "--n",
        "100",
        "--num-examples",
        "2",
        "--output",
        str(tmp_path / "again.tsv"),
    ]
    finished = subprocess.run(again, capture_output=True, text=True, env=env, check=False)
    assert finished.returncode == 2 and finished.stderr.count("\n") == 1
    assert "pass --model examples.my_cnn:my_cnn" in finished.stderr


def test_the_runner_is_a_library_function_with_the_command_lines_rows(run, checkpoint, tmp_path):
    from qrobust.jobs import SmoothingJob
    from qrobust.runner import run_job

    settings = {"sigma": 0.25, "n": 100, "n0": 20, "alpha": 0.01}
    cli = tmp_path / "cli.tsv"
    args = [f"--{key}={value}" for key, value in settings.items()]
    assert run("certify", checkpoint, *args, "--num-examples", 3, "--output", cli)[0] == 0
    job = SmoothingJob(command="certify", checkpoint=str(checkpoint), method="float-fp", **settings)
    library = tmp_path / "library.tsv"
    assert run_job(job, library, 3) == sum(int(line.split("\t")[4]) for line in cli.read_text().splitlines()[1:])

    def rows(path):
        return [
            [field for k, field in enumerate(line.split("\t")) if k != 5] for line in path.read_text().splitlines()
        ]  # all but the time

    assert rows(library) == rows(cli) and library.with_suffix(".json").exists()
