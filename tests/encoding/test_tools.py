"""DSML tool-call rendering (spec §9.4): string vs JSON parameters, invalid arguments, layout."""

from __future__ import annotations

import json

from encoding import encode_messages, parse_message_from_completion_text
from encoding.special_tokens import EOS
from encoding.tools import (
    arguments_as_mapping,
    arguments_json_from_parameters,
    render_parameter,
    render_tool_calls,
)


def call(name, arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def test_string_parameters_are_raw_and_others_are_json():
    args = {"s": 'a "quoted" 名', "i": 3, "f": 1.5, "b": True, "n": None, "l": [1, "x"], "o": {"k": "v"}}
    block = render_tool_calls([call("f", json.dumps(args))])
    assert '<｜DSML｜parameter name="s" string="true">a "quoted" 名</｜DSML｜parameter>' in block
    for key in ("i", "f", "b", "n", "l", "o"):
        expected = json.dumps(args[key], ensure_ascii=False)
        assert f'<｜DSML｜parameter name="{key}" string="false">{expected}</｜DSML｜parameter>' in block


def test_exact_layout_of_two_calls():
    block = render_tool_calls([call("a", '{"x": "1"}'), call("b", "{}")])
    assert block == (
        "\n\n<｜DSML｜tool_calls>\n"
        '<｜DSML｜invoke name="a">\n'
        '<｜DSML｜parameter name="x" string="true">1</｜DSML｜parameter>\n'
        "</｜DSML｜invoke>\n"
        '<｜DSML｜invoke name="b">\n'
        "\n"
        "</｜DSML｜invoke>\n"
        "</｜DSML｜tool_calls>"
    )


def test_invalid_json_arguments_become_one_arguments_parameter():
    block = render_tool_calls([call("f", "{not json")])
    assert '<｜DSML｜parameter name="arguments" string="true">{not json</｜DSML｜parameter>' in block
    assert arguments_as_mapping("[1, 2]") == {"arguments": "[1, 2]"}  # JSON, but not an object


def test_mapping_arguments_are_accepted():
    assert render_tool_calls([call("f", {"x": 1})]) == render_tool_calls([call("f", '{"x": 1}')])


def test_parameter_order_is_preserved():
    block = render_tool_calls([call("f", '{"z": 1, "a": 2, "m": 3}')])
    assert block.index('name="z"') < block.index('name="a"') < block.index('name="m"')


def test_arguments_json_reproduces_json_dumps():
    args = {"s": "x\ny", "n": [1, {"a": None}], "u": "ü"}
    params = [(k, v if isinstance(v, str) else json.dumps(v), isinstance(v, str)) for k, v in args.items()]
    assert arguments_json_from_parameters(params) == json.dumps(args, ensure_ascii=False)
    assert render_parameter("k", "v").endswith("</｜DSML｜parameter>")


def test_invalid_arguments_round_trip_to_an_arguments_key():
    messages = [
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "", "tool_calls": [call("f", "{oops")]},
    ]
    prompt = encode_messages(messages[:1], "chat")
    full = encode_messages(messages, "chat")
    parsed = parse_message_from_completion_text(full[len(prompt) :], "chat")
    assert json.loads(parsed["tool_calls"][0]["function"]["arguments"]) == {"arguments": "{oops"}
    assert full.endswith("</｜DSML｜tool_calls>" + EOS)
