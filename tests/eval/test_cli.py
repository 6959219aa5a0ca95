"""`lmforge eval` end to end in a subprocess: JSON on stdout, reports on disk, compare, bad input."""

import json
import os
import subprocess
import sys


def run(*args):
    env = {**os.environ, "LMFORGE_THREADS": "2"}
    return subprocess.run(
        [sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, env=env, timeout=600
    )


def test_eval_json_reports_and_compare(smollm2_gguf, tmp_path):
    out = tmp_path / "run"
    proc = run("eval", str(smollm2_gguf), "--task", "wiki-ppl", "--limit", "2", "--json", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    m = results["tasks"]["wiki-ppl"]["metrics"]
    assert abs(m["perplexity"] - 2.718281828 ** m["loss"]) < 1e-6 * m["perplexity"]
    assert (out / "results.json").exists() and (out / "report.md").exists()
    again = json.loads((out / "results.json").read_text())["tasks"]["wiki-ppl"]["metrics"]
    assert again == m
    png = tmp_path / "cmp.png"
    proc = run("eval", "compare", str(out), "--png", str(png))
    assert proc.returncode == 0 and "wiki-ppl" in proc.stdout and png.stat().st_size > 0


def test_eval_bad_input_is_one_line(smollm2_gguf, tmp_path):
    bad = tmp_path / "mc.jsonl"
    bad.write_text('{"context": "Q", "choices": ["a", "b"], "gold": 5}\n')
    for args in (
        ("eval", str(smollm2_gguf)),
        ("eval", str(smollm2_gguf), "--task", "multiple_choice", "--data", str(bad)),
        ("eval", "compare"),
    ):
        proc = run(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
