"""The `fastnabla` console script: subcommand dispatch and one-line errors with exit code 2."""
import pytest

from fastnabla.cli import main


@pytest.mark.parametrize("argv, needle", [
    ([], "missing subcommand"),
    (["fly"], "unknown subcommand 'fly'"),
    (["export", "--pretrained", "x"], "the following arguments are required: --lora, --output"),
])
def test_bad_cli_input_is_one_line_and_exit_2(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        code = main(argv)
        raise SystemExit(code)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err


def test_export_without_a_lora_file_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code = main(["export", "--pretrained", str(tmp_path / "nope"), "--lora", str(tmp_path / "empty"),
                 "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "pytorch_lora_weights.safetensors" in err and len(err.splitlines()) == 1, err


def test_train_subcommand_delegates_to_the_trainer_cli(capsys):
    assert main(["train", "gfn.reward_scale=-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastnabla.train: error: gfn.reward_scale") and len(err.splitlines()) == 1, err
