"""The one line shown for a library's exception (jaxgen.errors.first_line)."""

from jaxgen.errors import first_line


def test_first_line_is_the_first_non_blank_line_cut_to_the_limit():
    assert first_line(ValueError("\n  \n  bad header length  \nspec: {...}")) == "bad header length"
    assert first_line(ValueError("x" * 500)) == "x" * 200
    assert first_line(ValueError("x" * 500), 300) == "x" * 300


def test_an_empty_message_gives_the_exception_type():
    # `str(e).splitlines()[0]` raised IndexError here, replacing the library's error with jaxgen's own
    assert first_line(RuntimeError()) == "RuntimeError"
    assert first_line(ValueError(" \n ")) == "ValueError"
