"""mltk.errors: the one-line messages users see."""

from mltk.errors import first_line, out_of_memory


def test_first_line_is_the_exceptions_first_line_or_its_type():
    assert first_line(ValueError("\n  bad value\nTraceback details\n")) == "bad value"
    assert first_line(RuntimeError()) == "RuntimeError" and first_line(RuntimeError("  \n")) == "RuntimeError"
    assert first_line(RuntimeError(), "") == ""


def test_out_of_memory_says_the_first_line_then_the_advice():
    error = out_of_memory(MemoryError("CUDA out of memory. " + "x" * 200 + "\nmore"), "lower --batch-size")
    assert str(error) == f"out of memory (CUDA out of memory. {'x' * 100}): lower --batch-size"
