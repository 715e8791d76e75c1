import json

import pytest
import torch

from fastnabla.prompts import SIMPLE_ANIMALS, PromptSource, eval_prompts, load_prompts


def test_simple_animals_builtin():
    assert 40 <= len(SIMPLE_ANIMALS) <= 50
    assert len(set(SIMPLE_ANIMALS)) == len(SIMPLE_ANIMALS)
    assert all(a == a.strip().lower() and a for a in SIMPLE_ANIMALS)
    assert load_prompts("simple_animals") == SIMPLE_ANIMALS
    assert load_prompts("simple_animals") is not SIMPLE_ANIMALS  # callers cannot mutate the built-in list


def test_txt_json_csv(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("  a red car \n\n a blue bird\n", encoding="utf-8")
    assert load_prompts(txt) == ["a red car", "a blue bird"]
    js = tmp_path / "p.json"
    js.write_text(json.dumps(["one", "two"]))
    assert load_prompts(str(js)) == ["one", "two"]
    js2 = tmp_path / "objs.json"
    js2.write_text(json.dumps([{"prompt": "x", "id": 1}, {"prompt": "y", "id": 2}]))
    assert load_prompts(str(js2)) == ["x", "y"]
    csv_path = tmp_path / "p.csv"
    csv_path.write_text('id,caption,prompt\n1,"a cat, sleeping",cat\n2,a dog,dog\n', encoding="utf-8")
    assert load_prompts(str(csv_path)) == ["cat", "dog"]  # the 'prompt' column by default
    assert load_prompts(str(csv_path), column="caption") == ["a cat, sleeping", "a dog"]
    single = tmp_path / "single.csv"
    single.write_text("text\nhello\nworld\n")
    assert load_prompts(str(single)) == ["hello", "world"]
    assert load_prompts(["  a ", "b"]) == ["a", "b"]


def test_clear_errors(tmp_path):
    assert load_prompts("digits") == [str(d) for d in range(10)]
    with pytest.raises(ValueError, match=r"neither a built-in prompt set \(simple_animals, digits\) nor an existing file.*"
                                         r"did you mean the built-in set 'simple_animals'"):
        load_prompts("simple_animal")
    with pytest.raises(ValueError, match="nor an existing file"):
        load_prompts(str(tmp_path / "missing.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match=r"empty\.txt contains no prompts"):
        load_prompts(str(empty))
    with pytest.raises(ValueError, match=r"empty\.json contains no prompts"):
        (tmp_path / "empty.json").write_text("[]")
        load_prompts(str(tmp_path / "empty.json"))
    csv_path = tmp_path / "p.csv"
    csv_path.write_text("id,caption\n1,a cat\n")
    with pytest.raises(ValueError, match=r"column 'prompt_text' not in .*p\.csv; available columns: id, caption"):
        load_prompts(str(csv_path), column="prompt_text")
    with pytest.raises(ValueError, match=r"several columns \(id, caption\).*set prompts\.column"):
        load_prompts(str(csv_path))
    (tmp_path / "header_only.csv").write_text("prompt\n")
    with pytest.raises(ValueError, match="contains no prompts"):
        load_prompts(str(tmp_path / "header_only.csv"))
    (tmp_path / "blank.csv").write_text("")
    with pytest.raises(ValueError, match="needs a header row"):
        load_prompts(str(tmp_path / "blank.csv"))
    (tmp_path / "bad.json").write_text('{"prompts": ["a"]}')
    with pytest.raises(ValueError, match="must hold a JSON list"):
        load_prompts(str(tmp_path / "bad.json"))
    (tmp_path / "nums.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="entry 0 .* is a int, not a string"):
        load_prompts(str(tmp_path / "nums.json"))
    (tmp_path / "p.yaml").write_text("- a\n")
    with pytest.raises(ValueError, match="unsupported file type '.yaml'"):
        load_prompts(str(tmp_path / "p.yaml"))


def test_sample_is_deterministic_given_the_generator():
    src = PromptSource("simple_animals")
    a = src.sample(64, torch.Generator().manual_seed(123))
    b = src.sample(64, torch.Generator().manual_seed(123))
    c = src.sample(64, torch.Generator().manual_seed(124))
    assert a == b and a != c
    assert len(a) == 64 and set(a) <= set(SIMPLE_ANIMALS)
    g = torch.Generator().manual_seed(0)
    first, second = src.sample(8, g), src.sample(8, g)
    assert first != second  # the generator advances
    assert src.sample(0) == [] and len(src) == 45


def test_eval_prompts_fixed_seeds(tmp_path):
    ev = eval_prompts("simple_animals", 32, seed=0)
    assert ev == eval_prompts("simple_animals", 32, seed=0)
    assert ev != eval_prompts("simple_animals", 32, seed=1)
    assert len(ev) == 32 and len({p for p, _ in ev}) == 32  # n ≤ len: no prompt repeats
    assert all(isinstance(s, int) and 0 <= s < 2**31 for _, s in ev)
    f = tmp_path / "two.txt"
    f.write_text("a\nb\n")
    ev5 = eval_prompts(str(f), 5, seed=3)
    assert sorted(p for p, _ in ev5).count("a") in (2, 3) and len(ev5) == 5  # cycled through the permutation
    assert len({s for _, s in ev5}) == 5
    assert eval_prompts(PromptSource(str(f)), 5, seed=3) == ev5
    with pytest.raises(ValueError, match="n must be > 0"):
        eval_prompts("simple_animals", 0)
