"""tools/make_tiny_llama.py refuses bad arguments, naming them, before the tokenizer trains (exit 2)."""

from __future__ import annotations

import pytest

from tests._tools import tool_main


def _make_tiny_llama_main():
    return tool_main("make_tiny_llama")


def test_make_tiny_llama_refuses_bad_arguments(tmp_path, capsys):
    """--out a file was a FileExistsError traceback, --pretrain-steps -1 the LR schedule's, --layers 0 a model with
    no layers, --files 0 the whole standard library."""
    main = _make_tiny_llama_main()
    file = tmp_path / "f"
    file.write_text("")
    out = str(tmp_path / "m")
    for args, error in ((["--out", str(file)], f"--out {file}: exists and is not a directory"),
                        (["--out", out, "--pretrain-steps", "-1"], "--pretrain-steps must be >= 0, got -1"),
                        (["--out", out, "--layers", "0"], "--layers must be >= 1, got 0"),
                        (["--out", out, "--hidden", "0"], "--hidden must be >= 1, got 0"),
                        (["--out", out, "--files", "0"], "--files must be >= 1, got 0")):
        with pytest.raises(SystemExit) as exit_:
            main(args)
        assert exit_.value.code == 2, args
        assert capsys.readouterr().err.endswith(f"error: {error}\n")
    assert not (tmp_path / "m").exists()
