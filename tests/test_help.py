"""Every script's --help runs and shows its docstring as written: the description whole, examples line by line."""
import ast

import pytest

from helpers import ROOT, load_script


@pytest.mark.parametrize("name", ["train", "sample", "eval", "adapter", "compare"])
def test_help_shows_the_docstring_as_written(name, capsys):
    with open(f"{ROOT}/{name}.py", encoding="utf-8") as f:
        source = f.read()
    literal = ast.parse(source).body[0].value
    docstring = literal.value
    # a line ending in a lone backslash would join two example lines into one
    assert docstring.count("\n") == ast.get_source_segment(source, literal).count("\n")
    with pytest.raises(SystemExit) as stop:
        load_script(f"{name}.py").main(["--help"])
    assert stop.value.code == 0
    shown = capsys.readouterr().out
    assert docstring.split("\n\n")[0].strip() in shown     # the description, not cut after its first line
    for line in docstring.splitlines():
        assert line.strip() in shown, line
