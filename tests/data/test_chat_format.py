"""Chat template rendering compared with transformers' apply_chat_template (the reference), plus message checks."""

import pytest

from lmforge.data import chat_format
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import UserError

# Llama 3 style (Meta-Llama-3-8B-Instruct's template).
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Qwen2.5 style: a default system prompt, tools rendered with tojson, tool calls and tool responses.
QWEN2_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

CONVERSATIONS = {
    "single": [{"role": "user", "content": "What is 12 + 30?"}],
    "multi_turn": [
        {"role": "user", "content": "  Hi there!  "},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": 'Write <b>bold</b> & "quoted" text, ünïcödé 🚀.'},
    ],
    "with_system": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a prime."},
        {"role": "assistant", "content": "7"},
        {"role": "user", "content": "Another?\n\nPlease."},
    ],
}

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city <today>",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
TOOL_CONVERSATION = [
    {"role": "user", "content": "Weather in Zürich?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}
        ],
    },
    {"role": "tool", "content": '{"temp": 21}'},
]


@pytest.fixture(scope="module")
def tok(smollm2_metadata) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(smollm2_metadata)


@pytest.fixture(scope="module")
def hf(tok, tmp_path_factory):
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("smollm2-chat")
    tok.save(folder)
    return AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_smollm2_template_matches_transformers(tok, hf, name, add_generation_prompt):
    messages = CONVERSATIONS[name]
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("template", [LLAMA3_TEMPLATE, QWEN2_TEMPLATE], ids=["llama3", "qwen2"])
def test_other_templates_match_transformers(tok, hf, template, name, add_generation_prompt):
    messages = CONVERSATIONS[name]
    expected = hf.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    ours = chat_format.render(
        template,
        messages,
        add_generation_prompt=add_generation_prompt,
        bos_token=tok.bos_token,
        eos_token=tok.eos_token,
    )
    assert ours == expected


def test_tools_and_tool_calls_match_transformers(tok, hf):
    expected = hf.apply_chat_template(
        TOOL_CONVERSATION,
        tools=TOOLS,
        chat_template=QWEN2_TEMPLATE,
        tokenize=False,
        add_generation_prompt=True,
    )
    ours = chat_format.render(
        QWEN2_TEMPLATE,
        TOOL_CONVERSATION,
        add_generation_prompt=True,
        bos_token=None,
        eos_token=None,
        tools=TOOLS,
    )
    assert ours == expected
    assert '"description": "Weather for a city <today>"' in ours  # tojson does not HTML-escape


def test_rendered_prompt_tokenizes_like_transformers(tok, hf):
    messages = CONVERSATIONS["with_system"]
    text = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert (
        tok.encode(text)
        == hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    )


def test_text_parts_are_joined(tok):
    parts = [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]
    as_parts = tok.apply_chat_template([{"role": "user", "content": parts}])
    assert as_parts == tok.apply_chat_template([{"role": "user", "content": "first\nsecond"}])


def test_globals_and_missing_special_tokens():
    template = (
        "{{ strftime_now('%Y') | length }}|{{ bos_token }}|{% for m in messages %}{% break %}{% endfor %}"
    )
    assert (
        chat_format.render(template, [], add_generation_prompt=False, bos_token=None, eos_token=None) == "4||"
    )
    ns = "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}"
    messages = CONVERSATIONS["multi_turn"]
    assert (
        chat_format.render(ns, messages, add_generation_prompt=False, bos_token="<s>", eos_token="</s>")
        == "3"
    )


def test_templates_are_compiled_once():
    template = "{{ messages | length }}-cache-test"
    before = chat_format._compile.cache_info()
    for _ in range(3):
        chat_format.render(template, [], add_generation_prompt=False, bos_token=None, eos_token=None)
    after = chat_format._compile.cache_info()
    assert (after.misses - before.misses, after.hits - before.hits) == (1, 2)


# --- bad input ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([{"role": 3, "content": "hi"}], r"messages\[0\].role must be a string"),
        ([{"content": "hi"}], r"messages\[0\].role must be a string"),
        ([{"role": "user", "content": "ok"}, {"role": "user", "content": 42}], r"messages\[1\].content"),
        ([{"role": "user"}], r"messages\[0\].content"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "image_url"),
        (["hello"], r"messages\[0\] must be an object"),
        ("hello", "must be a list"),
    ],
)
def test_bad_messages_are_user_errors(tok, messages, match):
    with pytest.raises(UserError, match=match):
        tok.apply_chat_template(messages)


def test_assistant_tool_call_may_have_null_content():
    assert chat_format.validate_messages(TOOL_CONVERSATION)[1]["content"] is None


def test_bad_templates_are_user_errors():
    with pytest.raises(UserError, match="syntax error on line 1"):
        chat_format.render(
            "{% for m in messages %}", [], add_generation_prompt=False, bos_token=None, eos_token=None
        )
    alternate = "{% if messages[0].role != 'user' %}{{ raise_exception('Conversation must start with user') }}{% endif %}"
    with pytest.raises(UserError, match="Conversation must start with user"):
        chat_format.render(
            alternate,
            [{"role": "assistant", "content": "x"}],
            add_generation_prompt=False,
            bos_token=None,
            eos_token=None,
        )
    with pytest.raises(UserError, match="chat template"):
        chat_format.render(
            "{{ messages.__class__ }}{% set ns = namespace(_x=1) %}",
            [],
            add_generation_prompt=False,
            bos_token=None,
            eos_token=None,
        )


def test_no_chat_template_is_a_user_error(tok):
    bare = Tokenizer(tok._tok, eos_token=tok.eos_token)
    with pytest.raises(UserError, match="no chat template"):
        bare.apply_chat_template([{"role": "user", "content": "hi"}])
