"""Chat-template fixtures from HF transformers' `apply_chat_template` (the template stored in each GGUF),
for the tests of jaxgen's own chat formatting (`--chat`, `--system`, batch `messages`).

Run in a separate environment with transformers, jinja2, gguf, sentencepiece and protobuf (no torch
needed; none of these is a jaxgen dependency) and the model packages installed:

    python tools/make_chat_fixtures.py gemma3-270m smollm2-135m qwen2.5-coder-0.5b [--out tests/fixtures]

Also renders the published Llama 3.1 and Gemma 2 templates (tools/chat_templates/; text only).

Writes chat-templates.json: per model, the template and its special-token strings, and per
conversation the template's text (generation prompt added) and its token ids (HF's tokenizer built
from the GGUF). Templates that render tools (Qwen2.5's) also get tool-use conversations (tools=,
an assistant tool call, a tool result), and every template a conversation without the generation
prompt: the tests render the stored template with jaxgen.chat and compare texts (no model needed).

Gemma 3 270M is a base model and its GGUF carries no template; for it the template below is given to
HF, written from the format of the Gemma 3 instruction-tuned models (the one jaxgen follows): BOS,
the system text and a blank line before the first user turn, every content trimmed, the assistant's
role named "model".
"""
import argparse
import json
import pathlib
import sys

from transformers import AutoTokenizer

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from make_reference import gguf_path  # noqa: E402

GEMMA3_FORMAT = (
    "{{ bos_token }}"
    "{%- set prefix = messages[0]['content'] + '\\n\\n' if messages[0]['role'] == 'system' else '' -%}"
    "{%- for m in messages if m['role'] != 'system' -%}"
    "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\\n' }}"
    "{{- (prefix if loop.first else '') + m['content'] | trim }}{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}")

CONVERSATIONS = [
    [{"role": "user", "content": "Write a haiku about JAX."}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello. How can I help?"},
     {"role": "user", "content": "Name a prime number."}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Good morning"},
     {"role": "assistant", "content": "Bonjour"}, {"role": "user", "content": "Thank you"}],
    [{"role": "user", "content": "  padded content with spaces  \n"}],
    [{"role": "user", "content": "emoji \U0001F642 and \u65e5\u672c\u8a9e, code `x = 1`\nsecond line"}],
]


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "the city's name"}},
                   "required": ["city"]}}}]
TOOL_CONVERSATIONS = [
    [{"role": "system", "content": "You can call tools."}, {"role": "user", "content": "Weather in Paris?"}],
    [{"role": "user", "content": "Weather in Paris?"},
     {"role": "assistant", "content": "", "tool_calls": [
         {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
     {"role": "tool", "content": '{"temp_c": 18, "sky": "clear \u00e9t\u00e9"}'},
     {"role": "user", "content": "And in Tokyo?"}],
]


# A template written here to show how transformers prepares the messages: keys whose value is None are
# dropped (an OpenAI-style tool call's "content": None), a reasoning text given under reasoning_content,
# thinking or reasoning reads under the first two, and an object that is not JSON-like data reads as a
# placeholder (not used in the fixture: JSON cannot hold one).
PREPARED_FORMAT = (
    "{%- for m in messages -%}"
    "{{ m['role'] }}|{{ m.content is defined }}|{{ m.content }}|{{ m.reasoning_content }}|{{ m.thinking }}|"
    "{{ m | tojson }}\n"
    "{%- endfor -%}")
PREPARED_CONVERSATIONS = [
    [{"role": "user", "content": "Weather in Paris?", "name": None},
     {"role": "assistant", "content": None, "tool_calls": [
         {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
     {"role": "tool", "content": '{"temp_c": 18}'}],
    [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4", "reasoning": "two and two"},
     {"role": "user", "content": "3 + 3?"}, {"role": "assistant", "content": "6", "thinking": "three and three",
                                               "reasoning_content": None}],
]

# Published templates of families with no model package here (tools/chat_templates/*.jinja, copied as
# data from their checkpoints' tokenizer_config.json): rendered by HF with their special tokens, text only.
TEMPLATE_ONLY = {
    "llama3.1-template": ("llama3.1.jinja", {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}, "all"),
    "gemma2-template": ("gemma2.jinja", {"bos_token": "<bos>", "eos_token": "<eos>"}, "no-system"),
}


def template_only(fixtures):
    tok = AutoTokenizer.from_pretrained(gguf_path("smollm2-135m").parent, gguf_file=gguf_path("smollm2-135m").name)
    import transformers

    for name, (file, special, which) in TEMPLATE_ONLY.items():
        template = (pathlib.Path(__file__).parent / "chat_templates" / file).read_text()
        runs = [(m, None) for m in CONVERSATIONS if which == "all" or m[0]["role"] != "system"]
        if "tools" in template:
            runs += [(m, TOOLS) for m in TOOL_CONVERSATIONS]
        cases = []
        for msgs, tools in runs:
            text = tok.apply_chat_template(msgs, tools=tools, tokenize=False, add_generation_prompt=True,
                                           chat_template=template, **special)
            cases.append({"messages": msgs, "text": text, **({"tools": tools} if tools else {})})
            print(name, repr(text[:100]), file=sys.stderr)
        fixtures[name] = {"reference": f"transformers {transformers.__version__} apply_chat_template "
                                       f"(add_generation_prompt=True), tools/chat_templates/{file}",
                          "template": template, "special_tokens": special, "cases": cases}
    cases = [{"messages": m, "text": tok.apply_chat_template(m, tokenize=False, chat_template=PREPARED_FORMAT)}
             for m in PREPARED_CONVERSATIONS]
    fixtures["prepared-messages"] = {"reference": f"transformers {transformers.__version__} apply_chat_template, "
                                                  "PREPARED_FORMAT", "template": PREPARED_FORMAT,
                                     "special_tokens": {}, "cases": cases}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--out", default="tests/fixtures")
    args = ap.parse_args()
    out = pathlib.Path(args.out) / "chat-templates.json"
    fixtures = json.loads(out.read_text()) if out.exists() else {}
    for name in args.models:
        path = gguf_path(name)
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        template = None if tok.chat_template else GEMMA3_FORMAT
        cases = []
        used = template or tok.chat_template
        runs = [(m, None, True) for m in CONVERSATIONS] + [(CONVERSATIONS[2], None, False)]
        if "tools" in used:
            runs += [(m, TOOLS, True) for m in TOOL_CONVERSATIONS]
        for msgs, tools, gen in runs:
            text = tok.apply_chat_template(msgs, tools=tools, tokenize=False, add_generation_prompt=gen,
                                           chat_template=template)
            ids = tok(text, add_special_tokens=False)["input_ids"]
            case = {"messages": msgs, "text": text, "ids": ids}
            if tools:
                case["tools"] = tools
            if not gen:
                case["add_generation_prompt"] = False
            cases.append(case)
            print(name, repr(text[:120]), file=sys.stderr)
        import transformers

        source = "the GGUF's template" if template is None else "the Gemma 3 format (GEMMA3_FORMAT)"
        special = {k: getattr(tok, k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")
                   if getattr(tok, k, None)}
        fixtures[name] = {"reference": f"transformers {transformers.__version__} apply_chat_template "
                                       f"(add_generation_prompt=True unless a case says), {source}",
                          "template": used, "special_tokens": special, "cases": cases}
    template_only(fixtures)
    out.write_text(json.dumps(fixtures, ensure_ascii=False, indent=1))
    print("wrote", out, file=sys.stderr)


if __name__ == "__main__":
    main()
