"""Task files: validation errors name the line and field; built-ins load; few-shot draws are deterministic."""

import json

import pytest

from lmforge.errors import UserError
from lmforge.eval import tasks


def write_jsonl(path, rows):
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8"
    )
    return path


MC_OK = {"context": "Q: 1+1?\nA:", "choices": ["2", "3"], "gold": 0}


def test_missing_field_names_line_and_field(tmp_path):
    path = write_jsonl(tmp_path / "mc.jsonl", [MC_OK, "", {"context": "c", "gold": 0}])
    with pytest.raises(UserError, match=r"mc\.jsonl:3: missing field 'choices'"):
        tasks.load_multiple_choice(path)
    gen = write_jsonl(tmp_path / "gen.jsonl", [{"prompt": "p"}])
    with pytest.raises(UserError, match=r"gen\.jsonl:1: missing field 'reference'"):
        tasks.load_generation(gen)


def test_gold_out_of_range_names_line_and_field(tmp_path):
    path = write_jsonl(tmp_path / "mc.jsonl", [MC_OK, MC_OK | {"gold": 2}])
    with pytest.raises(UserError, match=r"mc\.jsonl:2: field 'gold' is 2, out of range for 2 choices"):
        tasks.load_multiple_choice(path)
    path = write_jsonl(tmp_path / "neg.jsonl", [MC_OK | {"gold": -1}])
    with pytest.raises(UserError, match=r":1: field 'gold' is -1"):
        tasks.load_multiple_choice(path)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (MC_OK | {"gold": "0"}, "field 'gold' must be int, got str"),
        (MC_OK | {"gold": True}, "field 'gold' must be int, got bool"),
        (MC_OK | {"choices": ["only"]}, "field 'choices' needs at least 2"),
        (MC_OK | {"choices": ["a", ""]}, "field 'choices' item 1"),
        ("[1, 2]", "expected a JSON object"),
        ('{"context": ', "not valid JSON"),
    ],
)
def test_bad_multiple_choice_rows(tmp_path, row, message):
    path = write_jsonl(tmp_path / "mc.jsonl", [MC_OK, row])
    with pytest.raises(UserError, match=message):
        tasks.load_multiple_choice(path)


def test_empty_task_file_is_an_error(tmp_path):
    for name in ("mc.jsonl", "ppl.jsonl"):
        (tmp_path / name).write_text("\n  \n", encoding="utf-8")
    with pytest.raises(UserError, match="is empty"):
        tasks.load_multiple_choice(tmp_path / "mc.jsonl")
    with pytest.raises(UserError, match="is empty"):
        tasks.load_perplexity(tmp_path / "ppl.jsonl")
    (tmp_path / "t.txt").write_text("   ", encoding="utf-8")
    with pytest.raises(UserError, match="is empty"):
        tasks.load_perplexity(tmp_path / "t.txt")


def test_resolve_tasks(tmp_path):
    data = write_jsonl(tmp_path / "faq.jsonl", [MC_OK])
    specs = tasks.resolve_tasks(["arith", "multiple_choice"], [str(data)])
    assert [s.name for s in specs] == ["arith", "multiple_choice:faq"]
    assert specs[0].builtin and specs[0].path.is_file()
    assert specs[1].main_metric == "acc_norm"
    with pytest.raises(UserError, match="unknown task 'nope'"):
        tasks.resolve_tasks(["nope"])
    with pytest.raises(UserError, match="needs a data file"):
        tasks.resolve_tasks(["generation"])
    with pytest.raises(UserError, match="left over"):
        tasks.resolve_tasks(["arith"], [str(data)])
    with pytest.raises(UserError, match="given twice"):
        tasks.resolve_tasks(["arith", "arith"])


def test_builtins_load_and_say_they_are_smoke_tests():
    for name, spec in tasks.BUILTIN.items():
        (resolved,) = tasks.resolve_tasks([name])
        data = tasks.load(resolved)
        n = len(data.texts) if isinstance(data, tasks.PPLData) else len(data)
        assert n >= 10, name
        assert "Smoke-level" in spec.description


def test_fewshot_is_deterministic_and_excludes_the_item():
    items = [tasks.MCItem(f"ctx{i}", ("a", "b"), i % 2) for i in range(10)]
    for i in range(10):
        picks = tasks.fewshot_indices(10, i, 3, seed=1)
        assert len(set(picks)) == 3 and i not in picks
        assert picks == tasks.fewshot_indices(10, i, 3, seed=1)
    text = tasks.mc_context(items, 4, 2, seed=1)
    shots = text.split("\n\n")
    assert len(shots) == 3 and shots[-1] == "ctx4"
    assert all(s.startswith("ctx") and s.endswith((" a", " b")) for s in shots[:2])
    assert tasks.fewshot_indices(3, 0, 5, seed=0) != []  # asks for more than exist: takes all others


def test_encode_pair_follows_lm_eval(smollm2):
    tok = smollm2.tokenizer
    ctx, cont = tasks.encode_pair(tok, "The capital of France is", " Paris", prefix_id=1)
    assert ctx + cont == tok.encode("The capital of France is Paris")
    assert tok.decode(cont) == " Paris"
    # a trailing space moves to the continuation, so " Paris" tokenizes as one word
    assert tasks.encode_pair(tok, "The capital of France is ", "Paris", prefix_id=1) == (ctx, cont)
    assert tasks.encode_pair(tok, "", "Paris", prefix_id=1) == ([1], tok.encode("Paris"))
