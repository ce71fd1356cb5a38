"""`genfuse serve --tensor-parallel-size 2`: a real server over two gloo ranks (rank 0 in the
server process, one worker it starts) on a tiny chat model, against the same server at N=1
through the official `openai` client: greedy completions and chat equal, streaming equal to
the whole answer, each rank's "holds ..." line in the log, and SIGTERM / SIGINT leave no worker
process behind."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from server_helpers import ServerProcess, wait_until

from llm_helpers import tiny_chat_folder

ARGS = ("--served-model-name", "tiny", "--backend", "torch", "--device", "cpu", "--threads", "1",
        "--num-kv-blocks", "64", "--block-size", "8")
PROMPTS = ["Hello", "The lighthouse keeper", "abc abc abc abc abc abc abc abc abc"]


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    return tiny_chat_folder(tmp_path_factory.mktemp("server_tp") / "chat")


def tp_server(chat) -> ServerProcess:
    # GENFUSE_TP_TIMEOUT_S bounds a hung rank's wait (the default is 120 s)
    return ServerProcess(str(chat), *ARGS, "--tensor-parallel-size", "2", env={"GENFUSE_TP_TIMEOUT_S": "60"}).start()


@pytest.fixture(scope="module")
def servers(chat):
    one = ServerProcess(str(chat), *ARGS).start()
    try:
        two = tp_server(chat)
    except BaseException:
        one.stop()
        raise
    yield one, two
    for s in (one, two):
        if s.proc.poll() is None:
            assert s.stop() == 0, s.log()[-3000:]


def descendants(pid: int) -> set[int]:
    """Every live process under ``pid`` (children's children too), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if stat[0] != "Z":
                children.setdefault(int(stat[1]), []).append(int(entry))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def alive(pids: set[int]) -> set[int]:
    left = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            left.add(pid)
    return left


def test_completions_equal_the_one_process_server(servers):
    one, two = servers
    for prompt in PROMPTS:
        want = one.openai().completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
        got = two.openai().completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
        assert got.choices[0].text == want.choices[0].text and want.choices[0].text
        assert got.usage.completion_tokens == want.usage.completion_tokens == 12
    batch = two.openai().completions.create(model="tiny", prompt=PROMPTS, max_tokens=6, temperature=0)
    alone = one.openai().completions.create(model="tiny", prompt=PROMPTS, max_tokens=6, temperature=0)
    assert [c.text for c in batch.choices] == [c.text for c in alone.choices]
    messages = [{"role": "user", "content": "Hi there"}]
    want = one.openai().chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    got = two.openai().chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert got.choices[0].message.content == want.choices[0].message.content


def test_streaming_over_2_ranks(servers):
    one, two = servers
    want = one.openai().completions.create(model="tiny", prompt="Once upon", max_tokens=16, temperature=0)
    chunks = list(two.openai().completions.create(model="tiny", prompt="Once upon", max_tokens=16, temperature=0,
                                                  stream=True))
    assert len(chunks) > 2  # streamed piece by piece, not in one chunk
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length" or chunks[-2].choices[0].finish_reason == "length"


def test_each_rank_logs_what_it_holds(servers):
    _, two = servers
    log = two.log()
    assert "tensor parallel: 2 ranks on gloo (workers started here)" in log
    # the tiny Llama: 4 query / 2 KV heads, intermediate 96, vocabulary 288, split in halves
    for rank in (0, 1):
        assert (f"tensor parallel rank {rank}/2 holds query heads {2 * rank}-{2 * rank + 1}, KV heads {rank}-{rank}, "
                f"intermediate {48 * rank}-{48 * rank + 47}, vocabulary {144 * rank}-{144 * rank + 143}:") in log


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_shutdown_leaves_no_worker(chat, sig, code):
    s = tp_server(chat)
    try:
        r = s.openai().completions.create(model="tiny", prompt="Hello", max_tokens=4, temperature=0)
        assert r.choices[0].text
        workers = descendants(s.proc.pid)
        assert workers, "the server started no worker process"
        s.proc.send_signal(sig)
        assert s.proc.wait(60) == code, s.log()[-3000:]
        wait_until(lambda: not alive(workers), 30, "the workers to exit")
    finally:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait(10)
    assert "Traceback" not in s.log(), s.log()[-3000:]
