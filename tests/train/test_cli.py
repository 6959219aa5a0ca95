"""The training commands end to end in subprocesses; bad input gives one line on stderr and exit code 2."""

import json

import pytest

from tests.train.conftest import TINY, assert_user_error, cli


@pytest.fixture(scope="module")
def run_home(tmp_path_factory, word_data):
    """A cwd with a finished 10-step run in runs/tiny, trained through `lmforge train`."""
    cwd = tmp_path_factory.mktemp("cli")
    proc = cli(
        "train", "-c", TINY, f"data={word_data}", "max_steps=10", "eval_every=5", cwd=cwd, home=cwd / "home"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "model stored as 'tiny'" in proc.stdout and "val loss" in proc.stdout
    return cwd


def test_runs_list_show_plot(run_home):
    home = run_home / "home"
    listed = cli("runs", "list", cwd=run_home, home=home)
    assert listed.returncode == 0 and "tiny" in listed.stdout and "10/10" in listed.stdout
    assert "max_steps" in listed.stdout
    shown = cli("runs", "show", "tiny", cwd=run_home, home=home)
    assert shown.returncode == 0 and "seq_len: 32" in shown.stdout
    assert json.loads(shown.stdout.strip().splitlines()[-1])["step"] == 10
    plotted = cli("runs", "plot", "tiny", cwd=run_home, home=home)
    png = run_home / "runs" / "tiny" / "loss.png"
    assert plotted.returncode == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(png.parent.glob(".*tmp*"))
    assert_user_error(cli("runs", "show", "tinny", cwd=run_home, home=home), "did you mean 'tiny'")


def test_trained_model_generates(run_home):
    proc = cli("generate", "tiny", "the cat", "-n", "8", "-t", "0", cwd=run_home, home=run_home / "home")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("the cat")


def test_data_prepare_cli(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\n" * 50)
    (tmp_path / "b.txt").write_text("goodbye moon\n" * 50)
    proc = cli(
        "data", "prepare", tmp_path / "a.txt", tmp_path / "b.txt", "--out", tmp_path / "d",
        "--tokenizer", "bytes", "--val-fraction", "0.5", "--workers", "1",
        cwd=tmp_path, home=tmp_path / "home",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "d" / "meta.json").read_text())["vocab_size"] == 257


@pytest.mark.parametrize(
    "args, needles",
    [
        (["data=nowhere"], ["nowhere does not exist", "lmforge data prepare"]),
        (["data=."], ["has no meta.json"]),
        (["optim.lrr=1"], ["unknown key 'optim.lrr'", "did you mean 'optim.lr'"]),
        (["seq_len=512", "model.max_seq_len=256"], ["seq_len 512 exceeds model.max_seq_len 256"]),
        (["optim.lr=abc"], ["optim.lr must be a float, got 'abc'"]),
        (["name=Bad Name"], ["run name 'Bad Name'"]),
    ],
)
def test_train_bad_input(tmp_path, args, needles):
    assert_user_error(cli("train", *args, cwd=tmp_path, home=tmp_path / "home"), *needles)


def test_train_unknown_yaml_key(tmp_path, word_data):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("batch_sise: 4\n")
    assert_user_error(
        cli("train", "-c", recipe, cwd=tmp_path, home=tmp_path / "home"), "did you mean 'batch_size'"
    )


def test_init_from_model_with_short_context(tmp_path, word_data, run_home):
    # tiny has max_seq_len 32: continuing it at seq_len 64 cannot fit its context.
    proc = cli(
        "train", f"data={word_data}", "init_from=tiny", "seq_len=64", cwd=tmp_path, home=run_home / "home"
    )
    assert_user_error(proc, "seq_len 64 exceeds tiny's max_seq_len 32")


def test_data_prepare_with_a_stored_models_tokenizer(tmp_path, run_home):
    (tmp_path / "a.txt").write_text("the cat sat\n")
    (tmp_path / "b.txt").write_text("on the mat\n")
    args = ["data", "prepare", tmp_path / "a.txt", tmp_path / "b.txt", "--out", tmp_path / "d"]
    args += ["--tokenizer", "tiny", "--val-fraction", "0.1", "--workers", "1"]
    proc = cli(*args, cwd=tmp_path, home=run_home / "home")
    assert proc.returncode == 0, proc.stderr[-2000:]
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    assert meta["tokenizer"] == "tokenizer" and meta["vocab_size"] == 257 and meta["eot_id"] == 256
    proc = cli("data", "prepare", tmp_path / "a.txt", "--out", tmp_path / "e", "--tokenizer", "tinyy",
               cwd=tmp_path, home=run_home / "home")  # fmt: skip
    assert_user_error(proc, "did you mean 'tiny'")
