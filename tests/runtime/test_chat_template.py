"""Chat templates render in a sandbox whose work is bounded (runtime.chat_template; issue 10,
item 6): runaway templates raise a clear ValueError quickly, real ones render exactly as
transformers renders them."""
from __future__ import annotations

import time

import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from genfuse.runtime.chat_template import ChatTemplateError, TemplateLimits, render
from genfuse.runtime.tokenizer import Tokenizer
from loader_helpers import smollm_gguf

LLAMA3 = (  # Meta-Llama-3-8B-Instruct's template
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
          " + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Qwen2.5 / Llama-3.1-style tool use: whitespace control, tojson, loop lookbehind, namespace,
# string tests, slicing, `~`, `%` and .format(), a macro, the generation block.
TOOLS = """{%- macro fmt(t) -%}{{ t.function.name ~ ': ' ~ (t.function.parameters | tojson(indent=2)) }}{%- endmacro -%}
{%- set ns = namespace(system='', n=0) -%}
{%- if messages[0].role == 'system' -%}{%- set ns.system = messages[0].content | trim -%}{%- endif -%}
{{- '<|im_start|>system\\n' + (ns.system or 'You are helpful.') }}
{%- if tools %}
{{- '\\n# Tools\\n' }}{%- for t in tools %}{{- '\\n' ~ loop.index ~ '. ' ~ fmt(t) }}{%- endfor %}
{%- endif %}
{{- '<|im_end|>\\n' }}
{%- for message in messages if message.role != 'system' %}
{%- set ns.n = ns.n + 1 %}
{%- if message.role == 'assistant' and message.tool_calls is defined %}
{{- '<|im_start|>assistant' }}{%- for c in message.tool_calls %}{{- '\\n<tool_call>' ~ c.function | tojson ~ '</tool_call>' }}{%- endfor %}{{- '<|im_end|>\\n' }}
{%- elif message.role == 'assistant' %}
{{- '<|im_start|>assistant\\n' }}{% generation %}{{- message.content.strip() }}{% endgeneration %}{{- '<|im_end|>\\n' }}
{%- else %}
{{- '<|im_start|>%s\\n%s<|im_end|>\\n' % (message.role, message.content) }}
{%- endif %}
{%- if loop.last and message.content is string and message.content.startswith('!') %}{{- '[%d]'|format(ns.n) }}{%- endif %}
{%- endfor %}
{{- ('=' * 3) ~ ' {} turns '.format(ns.n) ~ messages[-1].role[:4] | upper }}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"""

CHATS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "  Be terse. "}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": " 4 "}, {"role": "user", "content": "!and 😀 × 3?\nthanks"}],
    [{"role": "user", "content": "weather?"},
     {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "get", "arguments": {"c": "Paris"}}}]},
     {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}],
]
TOOL_LIST = [{"type": "function", "function": {"name": "get", "parameters": {"type": "object", "c": "é"}}}]


# (template, chat): the plain templates have no tool-call turns, so not the last chat
CASES = [(name, t, c) for name, t in (("llama3", LLAMA3), ("chatml", CHATML), ("tools", TOOLS))
         for c in range(len(CHATS)) if name == "tools" or c < 2]


@pytest.mark.parametrize("name,template,chat", CASES, ids=[f"{n}-{c}" for n, _, c in CASES])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_real_templates_render_like_transformers(name, template, chat, add_generation_prompt):
    messages = CHATS[chat]
    kwargs = dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    ref, _ = render_jinja_template(conversations=[messages], chat_template=template, tools=TOOL_LIST,
                                   add_generation_prompt=add_generation_prompt, **kwargs)
    got = render(template, messages=messages, tools=TOOL_LIST, documents=None,
                 add_generation_prompt=add_generation_prompt, **kwargs)
    assert got == ref[0]


def test_smollm_template_and_a_long_conversation():
    tok = Tokenizer.from_gguf(smollm_gguf())
    long = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} " * 50} for i in range(2000)]
    ref, _ = render_jinja_template(conversations=[long], chat_template=tok.chat_template, add_generation_prompt=True)
    t0 = time.perf_counter()
    assert tok.apply_chat_template(long) == ref[0]  # 2000 turns, 900k characters: within every limit
    assert time.perf_counter() - t0 < 2.0


RUNAWAY = {
    "nested range loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "nested loops over one list": "{% set r = range(1000)|list %}{% for a in r %}{% for b in r %}{% for c in r %}"
                                  "{% endfor %}{% endfor %}{% endfor %}",
    "exponential macro": "{% macro f(n) %}{% if n > 0 %}{{ f(n-1) }}{{ f(n-1) }}{% endif %}{% endmacro %}{{ f(60) }}",
    "printing loop": "{% for i in range(100000) %}{% for j in range(100000) %}xyz{% endfor %}{% endfor %}",
    # quadratic: each + copies the list (the running total of items made, or the clock, stops it)
    "growing list": "{% set ns = namespace(l=[]) %}{% for i in range(100000) %}{% set ns.l = ns.l + [i] %}"
                    "{% endfor %}",
}
HUGE = {
    "power": ("{{ 10 ** 10000000 }}", "an int"),
    "repeat": ("{{ 'x' * 10**9 }}", "repeated sequence"),
    "repeat literal": ("{{ 'x' * 1000000000 }}", "repeated sequence"),
    "list repeat": ("{{ [0] * 10**9 }}", "repeated sequence"),
    "doubling ~": ("{% set ns = namespace(x='x') %}{% for i in range(64) %}{% set ns.x = ns.x ~ ns.x %}{% endfor %}",
                   "a string"),
    "doubling +": ("{% set ns = namespace(x='x') %}{% for i in range(64) %}{% set ns.x = ns.x + ns.x %}{% endfor %}",
                   "concatenation"),
    "doubling set block": ("{% set ns = namespace(x='x') %}{% for i in range(64) %}{% set ns.x %}{{ ns.x }}"
                           "{{ ns.x }}{% endset %}{% endfor %}", "in all"),
    "center": ("{{ 'x'.center(10**9) }}", "str.center"),
    "center filter": ("{{ 'x'|center(1000000000) }}", "|center"),
    "format width": ("{{ '{:>1000000000}'.format(1) }}", "formatted field"),
    "format_map width": ("{{ '{x:>1000000000}'.format_map({'x': 1}) }}", "formatted field"),
    "printf width": ("{{ '%1000000000d' % 1 }}", "%-formatted field"),
    "printf star": ("{{ '%*d' % (10**9, 1) }}", "'*' width"),
    "format filter": ("{{ '%1000000000d'|format(1) }}", "%-formatted field"),
    "replace": ("{{ ('x' * 100000)|replace('x', 'y' * 100000) }}", "|replace"),
    "join": ("{{ (['x' * 100000] * 1000)|join }}", "joined string"),
    "str join": ("{{ ''.join(['x' * 100000] * 1000) }}", "joined string"),
    "repr of repeats": ("{{ ['x' * 100000] * 1000 }}", "a string"),
    "indent": ("{{ ('\n' * 100000)|indent(100000) }}", "|indent"),
    "expandtabs": ("{{ ('\t' * 100000).expandtabs(100000) }}", "expandtabs"),
    "lipsum": ("{{ lipsum(10**9) }}", "lipsum"),
    "tojson indent": ("{{ messages|tojson(indent=10**8) }}", "tojson"),
    "batch": ("{{ [1]|batch(10**9, 0)|list }}", "|batch"),
    "range": ("{{ range(10**30)|length }}", "range("),
    "recursion": ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "recursed"),
    "recursive loop": ("{% for x in [1, 2] recursive %}{{ loop([1, 2]) }}{% endfor %}", "recursed"),
    "float overflow": ("{{ 10.0 ** 400 }}", "overflowed"),
}
FAST = TemplateLimits(max_steps=50_000, max_seconds=0.5)


def _refused(template: str, limits=FAST, budget_s: float = 3.0) -> str:
    t0 = time.perf_counter()
    with pytest.raises(ValueError) as e:  # ChatTemplateError
        render(template, limits, messages=CHATS[0])
    assert time.perf_counter() - t0 < budget_s
    assert isinstance(e.value, ChatTemplateError) and "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("name", RUNAWAY)
def test_runaway_templates_stop(name):
    msg = _refused(RUNAWAY[name])
    assert "steps" in msg or "ran for more than" in msg or "in all" in msg, msg


@pytest.mark.parametrize("name", HUGE)
def test_huge_values_are_refused_before_they_are_made(name):
    template, needle = HUGE[name]
    assert needle in _refused(template), name


def test_default_limits_through_the_tokenizer():
    """apply_chat_template itself is bounded (the limits are the defaults, not FAST)."""
    tok = Tokenizer.from_gguf(smollm_gguf())
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="steps|ran for more than"):
        tok.apply_chat_template(CHATS[0], chat_template=RUNAWAY["nested range loops"])
    assert time.perf_counter() - t0 < 10.0
    with pytest.raises(ValueError, match="reserves"):
        tok.apply_chat_template(CHATS[0], chat_template="{% set __genfuse_iter = 1 %}")


def test_limits_scale_with_the_input():
    """A value as long as the input itself is not refused: the caps grow with the messages."""
    big = "x" * (FAST.max_chars + 10)
    assert len(render("{{ messages[0].content ~ '!' }}", FAST, messages=[{"role": "user", "content": big}])) == \
        len(big) + 1
    with pytest.raises(ChatTemplateError):
        render("{{ messages[0].content * 4 }}", FAST, messages=[{"role": "user", "content": big}])
