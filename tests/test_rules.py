"""mltk.rules: the vocabulary every check of a user's value or a file's field is stated in."""

import re

import numpy as np
import pytest

from mltk.errors import MltkError, UsageError
from mltk.rules import Number, Options, Where, from_file, show


@pytest.mark.parametrize("rule, good, bad, says", [
    (Number(0, 1, open_lo=True), 1, 0, "a number in (0, 1]"),
    (Number(1, whole=True), 10**30, 0, "an integer of at least 1"),
    (Number(0, open_lo=True), 1e-9, 0.0, "a number above 0"),
    (Number(0, 1, strings=False), 0.5, "0.5", "a number in [0, 1]"),
    (Number(-np.inf, np.inf, what="a finite number"), -1e300, float("inf"), "a finite number"),
])
def test_a_number_s_bounds_are_what_it_says(rule, good, bad, says):
    assert rule.check(good, "x", "f.yaml") == good and str(rule) == says
    with pytest.raises(UsageError, match="^" + re.escape(f"x in f.yaml must be {says}, got ")):
        rule.check(bad, "x", "f.yaml")


def test_a_numeric_string_is_a_number_in_yaml_and_not_in_a_json_file():
    assert Number(0, 1).check("1e-3", "lr", "c.yaml") == 1e-3
    with pytest.raises(UsageError):
        Number(0, 1, strings=False).check("1e-3", "lr", "")


def test_a_record_from_a_file_needs_its_fields_even_when_it_is_empty():
    record = Options({"a": Number(0, 1)}, required=("a",), empty_ok=False)
    with pytest.raises(UsageError, match=r"^meta.json needs 'a' \(a number in \[0, 1\]\)$"):
        record.check({}, "meta.json", "")
    assert Options({"a": Number(0, 1)}, required=("a",)).check({}, "augment", "c.yaml") == {}  # an option left to its default


def test_a_file_s_bad_field_is_the_file_s_fault_one_line_naming_it():
    rule = Options({"dim": Number(1, whole=True), "model": Where(lambda v: isinstance(v, dict), what="a state dict")})
    with pytest.raises(MltkError) as refused:
        from_file(rule, {"dim": 0}, "meta.json", "index directory 'i' is damaged", "write it again with `mltk index`")
    assert not isinstance(refused.value, UsageError)  # exit 1: the file is wrong, not the command line
    assert str(refused.value) == "index directory 'i' is damaged: meta.json['dim'] must be an integer of at least 1, got 0; write it again with `mltk index`"
    with pytest.raises(MltkError, match=r"^checkpoint 'c.pt': model must be a state dict, got \[1\]$"):
        from_file(rule.rules["model"], [1], "model", "checkpoint 'c.pt'")


def test_a_tensor_or_an_array_is_shown_by_its_shape_never_its_numbers():
    import torch

    assert show(torch.zeros(3, 1000)) == "a tensor of shape [3, 1000]"
    assert show(np.zeros((2, 2))) == "an array of shape [2, 2]"
