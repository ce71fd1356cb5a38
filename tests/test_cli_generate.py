"""`genfuse generate` / `genfuse chat` on the shipped SmolLM2 (CPU, torch backend, in-process)."""
import io

import pytest
import torch

from genfuse.cli import main


@pytest.fixture(autouse=True)
def _one_thread():
    # 2 shared cores: torch's thread pool would wait on descheduled threads (see llm_helpers)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_help_lists_generate_and_chat(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "generate" in out and "chat" in out
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = capsys.readouterr().out
    for flag in ("--model", "--max-tokens", "--temperature", "--top-p", "--top-k", "--seed", "--chat"):
        assert flag in out


def test_generate_streams_to_stdout_and_speed_to_stderr(capsys):
    rc = main(["generate", "What is the capital of France?", "--chat", "--temperature", "0",
               "--max-tokens", "24", "--backend", "torch", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert rc == 0
    assert out.strip() == "The capital of France is Paris."
    assert "tokens/s" in err and "finish: stop" in err


def test_chat_is_multi_turn(capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("What is the capital of France?\nAnd of Italy?\n"))
    rc = main(["chat", "--temperature", "0", "--max-tokens", "24", "--backend", "torch", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert rc == 0
    assert "Paris" in out and "Rome" in out
    assert err.count("tokens/s") == 2


def test_unknown_model_is_a_clean_error(capsys):
    assert main(["generate", "hi", "--model", "no-such-model"]) == 1
    assert "no-such-model" in capsys.readouterr().err
