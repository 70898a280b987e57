"""Chat templates (jaxgen.chat): the checkpoints' own Jinja templates render as transformers'
apply_chat_template renders them (fixtures by tools/make_chat_fixtures.py, tool use included), in a
sandbox a template cannot escape."""
import json
import pathlib

import pytest

from jaxgen import chat

FIXTURES = json.loads((pathlib.Path(__file__).parent / "fixtures" / "chat-templates.json").read_text())


@pytest.mark.parametrize("model", sorted(FIXTURES))
def test_templates_render_as_transformers(model):
    fx = FIXTURES[model]
    assert fx["cases"]
    for case in fx["cases"]:
        text = chat.render(fx["template"], case["messages"], tools=case.get("tools"),
                           add_generation_prompt=case.get("add_generation_prompt", True),
                           special_tokens=fx["special_tokens"])
        assert text == case["text"], case["messages"]


def test_tool_use_is_covered():
    """At least one fixture template renders tools, an assistant tool call and a tool result."""
    tool_cases = [c for fx in FIXTURES.values() for c in fx["cases"] if c.get("tools")]
    assert any(m["role"] == "tool" for c in tool_cases for m in c["messages"])
    assert any("get_weather" in c["text"] and '"city"' in c["text"] for c in tool_cases)


MALICIOUS = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.system('touch {marker}') }}",
    "{{ self._TemplateReference__context.cycler.__init__.__globals__.os.popen('touch {marker}').read() }}",
    "{% set x = messages.append({'role': 'user'}) %}{{ x }}",  # inputs are immutable
    "{{ lipsum.__globals__['os'].system('touch {marker}') }}",
]


@pytest.mark.parametrize("template", MALICIOUS)
def test_template_cannot_reach_python(template, tmp_path):
    marker = tmp_path / "pwned"
    with pytest.raises(ValueError) as e:
        chat.render(template.replace("{marker}", str(marker)), [{"role": "user", "content": "hi"}])
    assert "\n" not in str(e.value) and str(e.value).startswith("chat template"), str(e.value)
    assert not marker.exists()


def test_template_helpers():
    """raise_exception is one line with the template's message; strftime_now, tojson (non-ASCII kept,
    as transformers' filter does), loop controls and the {% generation %} block work."""
    with pytest.raises(ValueError, match="^chat template: System role not supported$"):
        chat.render("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                    "{% endif %}", [{"role": "system", "content": "x"}])
    t = ("{{ strftime_now('%Y') }}|{{ messages[0] | tojson }}|{% for m in messages %}{% if loop.index > 1 %}"
         "{% break %}{% endif %}{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}")
    import datetime
    out = chat.render(t, [{"role": "user", "content": "été"}, {"role": "user", "content": "no"}])
    assert out == f'{datetime.date.today().year}|{{"role": "user", "content": "été"}}|été'
    with pytest.raises(ValueError, match="^chat template"):
        chat.render("{% if %}", [])


def test_objects_in_messages_read_as_placeholders(tmp_path):
    """The sandbox lets a template call an object's public methods (an array's `tofile` writes a file), so
    as in transformers a template sees JSON-like data only: other objects read as "<TypeName>"."""
    import numpy as np

    marker = tmp_path / "written"
    t = "{{ messages[0].content }}|{{ messages[0].n }}|{{ messages[0].content.tofile('" + str(marker) + "') }}"
    try:
        chat.render(t, [{"role": "user", "content": np.zeros(3), "n": np.int64(2)}])
    except ValueError:
        pass  # (a str has no tofile: the template fails in one line)
    assert not marker.exists()
    assert chat.render("{{ messages[0].content }}|{{ messages[0].n }}",
                       [{"role": "user", "content": np.zeros(3), "n": np.int64(2)}]) == "<ndarray>|2"
