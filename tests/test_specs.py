"""core.specs: the one parser of `kind:NAME?k=v` and `mix:` specs (tasks, students, step checks)."""

from __future__ import annotations

import pytest

from nestling.core.errors import NestlingError
from nestling.core.specs import parse_query, split_mix


def test_a_comma_splits_a_mix_only_before_a_task_kind():
    spec = "mix:rg:basic_arithmetic?operators=+,-,*&max_digits=1, rg:chain_sum,file:q.jsonl"
    assert split_mix(spec) == [
        "rg:basic_arithmetic?operators=+,-,*&max_digits=1",
        "rg:chain_sum",
        "file:q.jsonl",
    ]
    assert split_mix("rg:chain_sum") == ["rg:chain_sum"]


def test_query_values_keep_plus_and_commas():
    assert parse_query("rg:x?operators=+,-&n=2") == ("rg:x", {"operators": "+,-", "n": "2"})
    assert parse_query("tiny") == ("tiny", {})


@pytest.mark.parametrize("spec", ["rg:x?n", "rg:x?=3", "rg:x?a=1&b"])
def test_a_part_without_key_and_value_is_one_line_naming_it(spec):
    with pytest.raises(NestlingError, match=r"task .*bad query part .*write key=value"):
        parse_query(spec, what="task")
