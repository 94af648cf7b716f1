"""`splitserve generate` as a user runs it: a real answer from the default model, clear errors, useful --help."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "splitserve", *args], capture_output=True, text=True, timeout=300)


def test_help_explains_every_generate_flag():
    out = _run("generate", "--help")
    assert out.returncode == 0
    for flag in (
        "--model",
        "--prompt",
        "--chat",
        "--max-tokens",
        "--temperature",
        "--seed",
        "--ignore-eos",
        "--dtype",
        "--kv-cache-memory",
    ):
        assert flag in out.stdout


@pytest.mark.slow
def test_chat_answer_from_default_model(smollm2):
    out = _run("generate", "--chat", "--prompt", "What is the capital of France?", "--max-tokens", "32")
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "/nonexistent/model"], "model path not found"),
        (["--max-tokens", "0"], "max_tokens must be >= 1"),
        (["--top-p", "2"], "top_p must be in (0, 1]"),
        (["--kv-cache-memory", "lots"], "not a memory size"),
    ],
)
def test_bad_input_is_a_clear_error_not_a_traceback(args, message):
    out = _run("generate", "--prompt", "hi", *args)
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_empty_prompt_is_a_clear_error(smollm2):
    out = _run("generate", "--prompt", "")
    assert out.returncode == 2 and "the prompt is empty" in out.stderr and "Traceback" not in out.stderr
