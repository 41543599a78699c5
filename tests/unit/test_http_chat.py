"""Chat templates render as transformers' apply_chat_template renders them; no template: the plain fallback."""

from __future__ import annotations

import json

import pytest

from services.http.chat import ChatTemplate, ChatTemplateError

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# Llama-2 style: bos_token, raise_exception on bad alternation, whitespace control
ALTERNATING = """{{ bos_token }}
{% for message in messages %}
    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {% endif %}
    {% if message['role'] == 'user' %}
        {{ '[INST] ' + message['content'] | trim + ' [/INST]' }}
    {% else %}
        {% generation %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endgeneration %}
    {% endif %}
{% endfor %}"""
TOJSON = "{% for m in messages %}{{ m | tojson }}{% if not loop.last %}{% continue %}{% endif %}|{% endfor %}"
MESSAGES = [{"role": "user", "content": "Grüß dich "}, {"role": "assistant", "content": "Hallo"},
            {"role": "user", "content": "Wie geht's?"}]


def write_model(tmp_path, template, **tokens):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, **tokens}))
    return str(tmp_path)


@pytest.mark.parametrize("template", [CHATML, ALTERNATING, TOJSON])
def test_rendering_equals_transformers(tmp_path, template):
    chat_template_utils = pytest.importorskip("transformers.utils.chat_template_utils")
    tokens = {"bos_token": "<s>", "eos_token": {"content": "</s>", "lstrip": False}}  # AddedToken as saved
    ours = ChatTemplate.for_model(write_model(tmp_path, template, **tokens))
    assert ours.name == "model"
    theirs = chat_template_utils.render_jinja_template(
        conversations=[MESSAGES], chat_template=template, add_generation_prompt=True, bos_token="<s>",
        eos_token="</s>")[0][0]
    assert ours.render(MESSAGES) == theirs


def test_a_template_refusing_the_conversation_raises_chat_template_error(tmp_path):
    template = ChatTemplate.for_model(write_model(tmp_path, ALTERNATING, bos_token="<s>", eos_token="</s>"))
    with pytest.raises(ChatTemplateError, match="alternate"):
        template.render([{"role": "assistant", "content": "first"}])


def test_named_templates_and_the_jinja_file(tmp_path):
    write_model(tmp_path, [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}])
    assert ChatTemplate.for_model(str(tmp_path)).render(MESSAGES) == "D"
    (tmp_path / "chat_template.jinja").write_text("J{{ messages | length }}")
    assert ChatTemplate.for_model(str(tmp_path)).render(MESSAGES) == "J3"  # the file wins, as in transformers


def test_no_template_uses_the_documented_fallback(tmp_path):
    template = ChatTemplate.for_model(str(tmp_path))
    assert template.name == "fallback"
    assert template.render(MESSAGES[:2]) == "user: Grüß dich \nassistant: Hallo\nassistant:"
