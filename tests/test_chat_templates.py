"""A chat template for every model that can have one: `--chat-template FILE` over the model's own, the model's
own, a built-in template of its family (Gemma's turns, Llama 3's headers, ChatML) where the vocabulary has the
family's turn tokens, and a refusal for a model with none of these; served and offline."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, processors
from transformers import PreTrainedTokenizerFast

from splitserve.errors import InvalidRequestError, ModelLoadError
from splitserve.launcher import ServeProcess
from splitserve.llm import LLM
from splitserve.model.chat_templates import BUILT_IN, choose_chat_template
from splitserve.model.tokenizer import encode, encode_chat, load_tokenizer
from tests.test_serving import ENGINE

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi there "}]
RENDERED = {
    "gemma": "<s><start_of_turn>user\nBe brief.\n\nHi there<end_of_turn>\n<start_of_turn>model\n",
    "llama3": "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n Hi there <|im_end|>\n"
    "<|im_start|>assistant\n",
}


def _without_template(smollm2: Path, *extra_tokens: str):
    """SmolLM2's tokenizer with no chat template, and `extra_tokens` added as special tokens."""
    tokenizer = load_tokenizer(smollm2)
    tokenizer.chat_template = None
    tokenizer.bos_token = "<s>"
    tokenizer.add_special_tokens({"additional_special_tokens": list(extra_tokens)})
    return tokenizer


@pytest.mark.parametrize(
    ("architecture", "family"),
    [("Gemma3ForCausalLM", "gemma"), ("LlamaForCausalLM", "llama3"), ("Qwen3ForCausalLM", "chatml")],
)
def test_a_model_without_a_template_gets_its_familys(smollm2, architecture, family):
    # Every family's turn tokens in the vocabulary: the architecture decides.
    markers = [m for name in ("gemma", "llama3") for m in BUILT_IN[name].markers]
    tokenizer = _without_template(smollm2, *markers)
    chosen = choose_chat_template(tokenizer, architecture)
    assert chosen.source == f"chat template: built-in {family} (the model has none; {architecture}: its family's)"
    text, ids = encode_chat(tokenizer, CONVERSATION)
    assert text == RENDERED[family]
    for marker in BUILT_IN[family].markers[:2]:  # each turn token is one token of the prompt
        assert tokenizer.convert_tokens_to_ids(marker) in ids
    # The family's end of turn ends an answer, as the end of sequence does.
    assert chosen.stop_token_ids == (tokenizer.convert_tokens_to_ids(BUILT_IN[family].markers[-1]),)


def test_a_family_template_is_taken_only_where_its_turn_tokens_are_in_the_vocabulary(smollm2):
    # A Gemma without Gemma's turn tokens but with ChatML's (SmolLM2's vocabulary): ChatML.
    tokenizer = _without_template(smollm2)
    said = choose_chat_template(tokenizer, "Gemma3ForCausalLM").source
    assert "built-in chatml" in said and "its vocabulary has that family's turn tokens" in said
    assert encode_chat(tokenizer, CONVERSATION)[0] == RENDERED["chatml"]
    # Gemma's alternation rule holds in its built-in template too: a clear 400, not a server error.
    gemma = _without_template(smollm2, *BUILT_IN["gemma"].markers)
    choose_chat_template(gemma, "Gemma3ForCausalLM")
    with pytest.raises(InvalidRequestError, match="roles must alternate"):
        encode_chat(gemma, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_a_model_with_no_template_and_no_known_turn_tokens_is_refused_chat():
    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")))
    chosen = choose_chat_template(tokenizer, "LlamaForCausalLM")
    assert "none" in chosen.source and chosen.stop_token_ids == ()
    with pytest.raises(InvalidRequestError, match="this model has no chat template"):
        encode_chat(tokenizer, CONVERSATION)


def test_a_template_file_comes_before_the_models_own(smollm2, tmp_path):
    tokenizer = load_tokenizer(smollm2)
    assert choose_chat_template(tokenizer, "LlamaForCausalLM").source == "chat template: the model's own"
    assert encode_chat(tokenizer, CONVERSATION)[0] != "plain: Hi there "
    file = tmp_path / "plain.jinja"
    file.write_text("plain:{% for m in messages if m.role == 'user' %}{{ m.content }}{% endfor %}\n")
    assert choose_chat_template(tokenizer, "LlamaForCausalLM", file).source == f"chat template: {file}"
    assert encode_chat(tokenizer, CONVERSATION)[0] == "plain: Hi there "
    with pytest.raises(ModelLoadError, match=r"--chat-template .*missing\.jinja"):
        choose_chat_template(tokenizer, "LlamaForCausalLM", tmp_path / "missing.jinja")


def test_served_and_offline_chat_use_the_template_file(tiny_chat_llama, tmp_path):
    """`serve --chat-template FILE` and `LLM(chat_template=FILE)` render the conversation with the file: the
    prompt's token count is the rendered text's, and the router's start line says which template it took."""
    file = tmp_path / "plain.jinja"
    file.write_text("plain:{% for m in messages if m.role == 'user' %}{{ m.content }}{% endfor %}\n")
    tokenizer = load_tokenizer(tiny_chat_llama)
    want = len(tokenizer("plain: Hi there ", add_special_tokens=False).input_ids)
    body = {"model": "m", "messages": CONVERSATION, "max_tokens": 1, "temperature": 0}

    args = ["--prefill", "0", "--decode", "0", "--both", "1", *ENGINE, "--served-model-name", "m"]
    server = ServeProcess(tiny_chat_llama, [*args, "--chat-template", str(file)], 1)
    try:
        r = server.http.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == want
        assert f"chat template: {file}" in server.logs()
    finally:
        server.stop()

    llm = LLM(str(tiny_chat_llama), chat_template=str(file), dtype="fp32", kv_cache_memory="8MiB")
    [out] = llm.chat(CONVERSATION, use_tqdm=False)
    assert out.prompt == "plain: Hi there " and len(out.prompt_token_ids) == want


def test_served_built_in_template_renders_the_turns_and_ends_the_answer_at_its_end_of_turn(tiny_chat_llama, tmp_path):
    """A model folder without a template (SmolLM2's vocabulary: ChatML's turn tokens) is served with the built-in
    ChatML template, said at start; a chat answer ends at `<|im_end|>` even with `ignore_eos` (it is the end of
    turn, a stop token), where a completion with the same fields runs to max_tokens."""
    model = tmp_path / "model"
    shutil.copytree(tiny_chat_llama, model)
    (model / "chat_template.jinja").unlink()
    tokenizer = load_tokenizer(model)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    want = len(tokenizer(RENDERED["chatml"], add_special_tokens=False).input_ids)
    forced = {"max_tokens": 4, "temperature": 0, "ignore_eos": True, "logit_bias": {str(end): 100}}
    args = ["--prefill", "0", "--decode", "0", "--both", "1", *ENGINE, "--served-model-name", "m"]
    server = ServeProcess(model, args, 1)
    try:
        assert "chat template: built-in chatml (the model has none; LlamaForCausalLM: its vocabulary" in server.logs()
        r = server.http.post("/v1/chat/completions", json={"model": "m", "messages": CONVERSATION, **forced})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["usage"]["prompt_tokens"] == want
        assert body["choices"][0]["finish_reason"] == "stop" and body["usage"]["completion_tokens"] == 1
        r = server.http.post("/v1/completions", json={"model": "m", "prompt": "Hi", **forced})
        assert r.json()["usage"]["completion_tokens"] == 4
    finally:
        server.stop()


def test_encoding_through_the_rust_tokenizer_gives_transformers_ids(smollm2):
    """`encode` (the router's and LLM's prompt path) skips transformers' per-call Python but must give exactly
    `tokenizer(text).input_ids`: special tokens (added by a post-processor, or written in the text), spaces and
    unicode included; on the embedded tokenizer and on one that adds a BOS (a Llama-style post-processor)."""
    embedded = load_tokenizer(Path(smollm2))
    with_bos = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(embedded.backend_tokenizer.to_str()))
    with_bos.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", pair="<|im_start|> $A $B", special_tokens=[("<|im_start|>", 1)]
    )
    texts = ["Hello, world!", "  leading and trailing  ", "naïve café 東京 🚀", "a\n\nb\tc", "",
             "<|im_start|>user\nhi<|im_end|>", "<|endoftext|>x", "1234567890" * 5]  # fmt: skip
    for tokenizer in (embedded, with_bos):
        for text in texts:
            for special in (True, False):
                want = tokenizer(text, add_special_tokens=special).input_ids
                assert encode(tokenizer, text, special) == want, (text, special)
    assert encode(with_bos, "hi")[0] == 1 != encode(with_bos, "hi", False)[0]
