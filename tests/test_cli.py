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
    # Germany, not France: the embedded model's first token for France is a 0.09-logit call in fp32 ("The" over
    # "L"), which the quantized modes (and llama.cpp on the same file) tip the other way; Germany's is 0.67.
    out = _run("generate", "--chat", "--prompt", "What is the capital of Germany?", "--max-tokens", "32")
    assert out.returncode == 0, out.stderr
    assert "Berlin" in out.stdout


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


def test_bench_against_no_server_is_one_line_and_fails():
    for extra in ([], ["--model", "some-model"]):
        out = _run("bench", "--url", "http://127.0.0.1:9", "--rate", "1", "--num-requests", "2", *extra)
        assert out.returncode == 2, out
        assert out.stderr.strip().count("\n") == 0 and "no OpenAI-compatible server answers" in out.stderr


def test_a_busy_port_is_one_line():
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = _run("router", "--port", str(port), "--worker-port", "0")
    assert out.returncode == 2
    assert out.stderr.strip() == (
        f"splitserve: error: cannot listen on 127.0.0.1:{port}: Address already in use "
        "(another server there? choose another --port)"
    )


def test_verbose_is_accepted_before_and_after_the_subcommand():
    from splitserve.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["-v", "serve"]).verbose and parser.parse_args(["serve", "-v"]).verbose
    assert parser.parse_args(["decode", "--router", "tcp://h:1", "--verbose"]).verbose
    assert not parser.parse_args(["serve"]).verbose


def test_plan_quick_recommends_a_split(tiny_llama_gqa):
    out = _run("plan", "--quick", "--model", str(tiny_llama_gqa), "--workers", "2", "--rate", "1", "--slo",
               "ttft=5,tpot=1", "--input-len", "uniform:16,64", "--output-len", "uniform:4,16", "--num-requests",
               "50", "--dtype", "fp32")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "quick" in out.stdout and "recommend" in out.stdout.lower(), out.stdout


def test_serve_refuses_an_unsupported_architecture_before_starting_workers(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from splitserve.model.config import SUPPORTED_ARCHITECTURES

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path)
    out = _run("serve", "--model", str(tmp_path), "--port", "0", "--worker-port", "0")
    assert out.returncode == 2, out
    assert "Traceback" not in out.stderr and "starting" not in out.stdout
    supported = ", ".join(SUPPORTED_ARCHITECTURES)
    assert out.stderr.strip() == f"splitserve: error: unsupported architecture GPT2LMHeadModel; supported: {supported}"
