"""`genfuse generate` / `genfuse chat` when things go wrong (issue 10): bad devices and flags,
a model that turns NaN, Ctrl-C. Errors are one line naming the cause, exit 1 (2 for usage);
Ctrl-C stops quietly (generate: exit 130; chat: the reply stops, the conversation stays, and at
the prompt it ends). The model is a tiny random Llama with a character-level tokenizer
(tests/runtime/llm_helpers.py); Ctrl-C is a real SIGINT sent to a real `python -m genfuse`."""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from genfuse.cli import main

sys.path.insert(0, str(Path(__file__).parent / "runtime"))
from llm_helpers import tiny_chat_folder  # noqa: E402

WAIT = 120  # seconds: the bound on every wait for a subprocess (startup imports torch and triton)
FLAGS = ["--temperature", "0", "--backend", "torch", "--device", "cpu"]


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: see tests/runtime/llm_helpers.py
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    # a long context, so that a reply can run for minutes and Ctrl-C always lands in it
    return tiny_chat_folder(tmp_path_factory.mktemp("tinychat") / "m", max_positions=32768)


def _one_line_error(err: str, command: str) -> str:
    assert err.startswith(f"genfuse {command}: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("device, message", [
    ("foo", "argument --device: device 'foo' is not a torch device name (expected 'cpu', 'cuda' or 'cuda:N')"),
    ("meta", "argument --device: device 'meta' is not supported: genfuse runs on 'cpu' or 'cuda'"),
])
def test_unknown_devices_are_usage_errors(capsys, folder, device, message):
    for command in (["generate", "hi"], ["chat"]):
        with pytest.raises(SystemExit) as exc:
            main([*command, "--model", str(folder), "--device", device])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


def test_a_device_that_is_not_there_is_one_line(capsys, folder):
    # on this CPU build "built without CUDA"; on a GPU machine "only N CUDA GPU(s) are visible"
    assert main(["generate", "hi", "--model", str(folder), "--device", "cuda:99"]) == 1
    assert "device 'cuda:99': " in _one_line_error(capsys.readouterr().err, "generate")


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "nan"], "temperature must be a finite number, got nan"),
    (["--temperature", "-1"], "temperature must be >= 0"),
    (["--top-p", "0"], "top_p must be in (0, 1]"),
    (["--max-tokens", "0"], "max_tokens must be an int >= 1"),
    (["--top-k", "-2"], "top_k must be an int"),
    (["--seed", str(2**64)], "seed must be None or an int in [-2**63, 2**64)"),
])
def test_bad_sampling_flags_are_usage_errors(capsys, folder, flags, message):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "hi", "--model", str(folder), *flags])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_too_many_tokens_is_one_line(capsys, folder):
    assert main(["generate", "hi", "--model", str(folder), "--max-tokens", str(10**9), *FLAGS]) == 1
    assert "exceed max_model_len=32768" in _one_line_error(capsys.readouterr().err, "generate")


def test_a_kv_cache_dtype_the_layers_cannot_keep_is_one_line(capsys, folder):
    # the tiny model's dense safetensors weights run the torch layers: float16 K/V is refused
    assert main(["generate", "hi", "--model", str(folder), "--kv-cache-dtype", "float16", *FLAGS]) == 1
    assert "kv_cache_dtype='float16' differs from the model's float32" in _one_line_error(capsys.readouterr().err,
                                                                                         "generate")
    with pytest.raises(SystemExit) as exc:
        main(["generate", "hi", "--model", str(folder), "--kv-cache-dtype", "fp8"])
    assert exc.value.code == 2 and "invalid choice: 'fp8'" in capsys.readouterr().err


def test_a_model_that_turns_nan_fails_with_one_line(capsys, folder, tmp_path):
    """Before: NaN logits sampled as token 0 ("<unk>") to max_tokens, exit 0."""
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "nan"
    shutil.copytree(folder, broken)
    weights = load_file(broken / "model.safetensors")
    weights["model.norm.weight"][0] = float("nan")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    for command in (["generate", "hi"], ["generate", "hi", "--chat"]):
        assert main([*command, "--model", str(broken), "--max-tokens", "8", *FLAGS]) == 1
        err = _one_line_error(capsys.readouterr().err, "generate")
        assert "logits" in err and "NaN" in err


# --------------------------------------------------------------------------- Ctrl-C in process


def test_chat_keeps_the_conversation_after_ctrl_c_mid_reply(monkeypatch, capsys, folder):
    """Ctrl-C during the first reply, raised inside the generation loop (where a real SIGINT
    lands: here from the detokenizer, at the reply's 7th token): the reply stops after what was
    shown, the next prompt renders the conversation with that partial reply, and the second
    reply runs normally (the LLM was released)."""
    from genfuse.runtime.llm import LLM
    from genfuse.runtime.sampling import SamplingParams
    from genfuse.runtime.tokenizer import IncrementalDetokenizer

    ref = LLM(folder, device="cpu", backend="torch")
    first = [{"role": "user", "content": "first"}]
    full = ref.generate([ref.chat_prompt(first)], SamplingParams(max_tokens=12, temperature=0))[0].text
    rendered = []
    real_prompt, real_push, pushes = LLM.chat_prompt, IncrementalDetokenizer.push, []

    def chat_prompt(self, messages):
        rendered.append([dict(m) for m in messages])
        return real_prompt(self, messages)

    def push(self, token_id):
        pushes.append(token_id)
        if len(pushes) == 7:
            raise KeyboardInterrupt
        return real_push(self, token_id)

    monkeypatch.setattr(LLM, "chat_prompt", chat_prompt)
    monkeypatch.setattr(IncrementalDetokenizer, "push", push)
    monkeypatch.setattr("sys.stdin", io.StringIO("first\nsecond\n"))
    try:
        rc = main(["chat", "--model", str(folder), "--max-tokens", "12", *FLAGS])
    except KeyboardInterrupt:  # let pytest report it, rather than take it as the user's Ctrl-C
        pytest.fail("KeyboardInterrupt escaped genfuse chat")
    assert rc == 0
    out, err = capsys.readouterr()
    shown = out.split(">>> ")[1].removesuffix("\n")  # what the first reply printed before Ctrl-C
    assert shown and full.startswith(shown) and len(shown) < len(full)
    assert rendered[1] == [*first, {"role": "assistant", "content": shown}, {"role": "user", "content": "second"}]
    assert err.count("[interrupted]") == 1 and err.count("tokens/s") == 1 and "Traceback" not in err


# --------------------------------------------------------------------------- Ctrl-C for real


class _Cli:
    """`python -m genfuse ARGS` with pipes; stdout and stderr read by threads as they come."""

    def __init__(self, *args: str):
        # SIGINT as Python's KeyboardInterrupt even when this test runs with SIGINT ignored
        # (a child inherits SIG_IGN, and Python then installs no handler of its own)
        code = ("import signal, runpy; signal.signal(signal.SIGINT, signal.default_int_handler); "
                "runpy.run_module('genfuse', run_name='__main__', alter_sys=True)")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-c", code, *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        self._out, self._err = bytearray(), bytearray()
        self._readers = [threading.Thread(target=self._read, args=(s, b), daemon=True)
                         for s, b in ((self.proc.stdout, self._out), (self.proc.stderr, self._err))]
        for t in self._readers:
            t.start()

    @staticmethod
    def _read(stream, buf):
        while chunk := os.read(stream.fileno(), 4096):
            buf.extend(chunk)

    @property
    def out(self) -> str:
        return self._out.decode(errors="replace")

    @property
    def err(self) -> str:
        return self._err.decode(errors="replace")

    def wait_for(self, what: str, condition) -> None:
        deadline = time.monotonic() + WAIT
        while not condition(self.out):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"waiting for {what}: rc={self.proc.returncode}\nstdout: {self.out[-2000:]}\n"
                            f"stderr: {self.err[-4000:]}")
            time.sleep(0.05)

    def send(self, line: str) -> None:
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def interrupt(self) -> None:
        self.proc.send_signal(signal.SIGINT)

    def finish(self) -> int:
        try:
            rc = self.proc.wait(timeout=WAIT)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"did not exit after Ctrl-C\nstderr: {self.err[-4000:]}")
        for t in self._readers:
            t.join(timeout=WAIT)
        return rc

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=WAIT)


def _no_traceback(err: str) -> None:
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err


def test_ctrl_c_stops_generate_with_exit_130(folder):
    cli = _Cli("generate", "Once upon a time", "--model", str(folder), "--max-tokens", "30000", *FLAGS)
    cli.wait_for("the reply to start", lambda out: len(out) >= 20)
    cli.interrupt()
    assert cli.finish() == 130
    _no_traceback(cli.err)
    assert "[interrupted]" in cli.err and "tokens/s" not in cli.err  # stopped, not finished


def test_ctrl_c_in_chat_stops_the_reply_and_at_the_prompt_ends(folder):
    cli = _Cli("chat", "--model", str(folder), "--max-tokens", "30000", *FLAGS)
    for turn in (1, 2):  # the second turn runs only if the first one's interrupt released the LLM
        cli.wait_for(f"prompt {turn}", lambda out: out.count(">>> ") == turn)
        cli.send(f"question {turn}")
        cli.wait_for(f"reply {turn}", lambda out: len(out.rsplit(">>> ", 1)[1]) >= 20)
        cli.interrupt()
    cli.wait_for("prompt 3", lambda out: out.count(">>> ") == 3)
    assert cli.err.count("[interrupted]") == 2
    cli.interrupt()  # at the prompt: leave quietly
    assert cli.finish() == 0
    _no_traceback(cli.err)
