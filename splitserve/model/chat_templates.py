"""Which chat template a model's conversations go through, where its tokenizer carries none.

In order: a Jinja file the operator names (`--chat-template FILE`, as vLLM and llama-server take it); the
model's own; else a built-in template for the model's family where the family has a known one (Gemma's
`<start_of_turn>` turns, Llama 3's headers, ChatML for Qwen), taken only when the family's marker tokens are
single tokens of the vocabulary (a template whose markers the model never saw would answer garbage); its
end-of-turn token then also ends chat answers (the model's config, written without the template, may not list
it as an end of sequence). A model with none of these keeps none, and its chat requests are refused
(`tokenizer.encode_chat`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from splitserve.errors import ModelLoadError


@dataclass(frozen=True)
class BuiltIn:
    markers: tuple[str, ...]  # special tokens the template writes, its end of turn last: all must be in the vocabulary
    template: str


@dataclass(frozen=True)
class ChatTemplate:
    """What `choose_chat_template` chose: where the template came from, and the tokens that end a chat answer
    besides the model's end of sequence."""

    source: str
    stop_token_ids: tuple[int, ...] = ()


# The families' templates as their instruct models ship them, reduced to text content (the router hands
# `apply_chat_template` each message's content as one string).
BUILT_IN = {
    "gemma": BuiltIn(
        ("<start_of_turn>", "<end_of_turn>"),
        "{{ bos_token }}"
        "{%- if messages[0]['role'] == 'system' -%}"
        "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
        "{%- set loop_messages = messages[1:] -%}"
        "{%- else -%}"
        "{%- set first_user_prefix = '' -%}"
        "{%- set loop_messages = messages -%}"
        "{%- endif -%}"
        "{%- for message in loop_messages -%}"
        "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
        "{%- endif -%}"
        "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
        "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
        "{{ message['content'] | trim }}"
        "{{ '<end_of_turn>\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}",
    ),
    "llama3": BuiltIn(
        ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        "{{- bos_token }}"
        "{%- for message in messages %}"
        "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
        " + '<|eot_id|>' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}",
    ),
    "chatml": BuiltIn(
        ("<|im_start|>", "<|im_end|>"),
        "{%- for message in messages %}"
        "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}",
    ),
}
FAMILIES = {
    "Gemma3ForCausalLM": "gemma",
    "LlamaForCausalLM": "llama3",
    "Qwen2ForCausalLM": "chatml",
    "Qwen3ForCausalLM": "chatml",
    "Qwen2MoeForCausalLM": "chatml",
    "Qwen3MoeForCausalLM": "chatml",
}


def choose_chat_template(
    tokenizer: PreTrainedTokenizerBase, architecture: str, file: str | Path | None = None
) -> ChatTemplate:
    """Set `tokenizer.chat_template` as the module says; the source says where it came from (the start-up line)."""
    if file is not None:
        path = Path(file)
        try:
            tokenizer.chat_template = path.read_text()
        except OSError as e:
            raise ModelLoadError(f"--chat-template {file}: {e.strerror or e}") from None
        return ChatTemplate(f"chat template: {path}")
    if tokenizer.chat_template is not None:
        return ChatTemplate("chat template: the model's own")
    vocab = tokenizer.get_vocab()
    preferred = FAMILIES.get(architecture)
    for name in sorted(BUILT_IN, key=lambda n: n != preferred):  # the architecture's family first
        built_in = BUILT_IN[name]
        if all(marker in vocab for marker in built_in.markers):
            tokenizer.chat_template = built_in.template
            why = "its family's" if name == preferred else "its vocabulary has that family's turn tokens"
            source = f"chat template: built-in {name} (the model has none; {architecture}: {why})"
            return ChatTemplate(source, (vocab[built_in.markers[-1]],))
    return ChatTemplate("chat template: none (the model has none and no known family's turn tokens: chat is refused)")
