"""Real torch.distributed (gloo) ranks for the tensor-parallel tests: `run_ranks`
(genfuse.runtime.distributed) spawns ``world`` processes on 127.0.0.1 and returns what each
rank's function returned; the per-rank step runners below."""
from __future__ import annotations

import torch

from genfuse.runtime.distributed import run_ranks  # noqa: F401  (one definition, shared with bench/tp_bench.py)


def single_sequence_steps(model, config, prompt: list[int], n_new: int, *, block_size: int = 16):
    """Prefill ``prompt`` then ``n_new`` greedy decode steps of one sequence through
    ``model.forward_step`` on fresh pools holding this rank's KV heads. Returns (the prefill's
    logits for every prompt row, the decode steps' logits, the greedy tokens)."""
    from genfuse.runtime.engine.kv_cache import StepInputs

    total = len(prompt) + n_new
    nb = -(-total // block_size)
    shape = (config.num_layers, nb, block_size, model.num_kv_heads, config.head_dim)
    k_pool, v_pool = torch.zeros(shape), torch.zeros(shape)
    model.setup_rope(total + 1)
    table = torch.arange(nb, dtype=torch.int32)[None]

    def step(tokens, start, all_rows):
        T = len(tokens)
        i32 = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
        inp = StepInputs(input_ids=i32(tokens), positions=torch.arange(start, start + T, dtype=torch.int32),
                         slot_mapping=torch.arange(start, start + T, dtype=torch.int32), block_table=table,
                         seq_lens=i32([start + T]), query_start_loc=i32([0, T]),
                         logits_indices=torch.arange(T, dtype=torch.int32) if all_rows else i32([T - 1]),
                         max_query_len=T, max_seq_len=start + T)
        return model.forward_step(inp, k_pool, v_pool)

    prefill = step(prompt, 0, True)
    tokens, decode_logits = [int(prefill[-1].argmax())], []
    for j in range(n_new - 1):
        logits = step([tokens[-1]], len(prompt) + j, False)
        decode_logits.append(logits[0])
        tokens.append(int(logits[0].argmax()))
    return prefill, torch.stack(decode_logits) if decode_logits else torch.zeros(0), tokens


def tp_rank_run(rank, world, model_path, prompt, n_new):
    """One rank: load the full model, keep this rank's shard, run `single_sequence_steps` (the
    CPU runtime's torch ops: the split does not depend on the backend, the interpreter is slow)."""
    from genfuse.runtime.distributed import TPGroup, TPPlan
    from genfuse.runtime.loader import load_model

    loaded = load_model(model_path, device="cpu", backend="torch", tensor_parallel=(rank, world))
    assert loaded.model.tp is None or loaded.model.tp.plan == TPPlan.make(loaded.config, rank, world)
    prefill, decode, tokens = single_sequence_steps(loaded.model, loaded.config, prompt, n_new)
    out = (prefill.numpy(), decode.numpy(), tokens)  # numpy pickles by value (a tensor would be shared memory)
    held = {"kv_heads": list(loaded.model.tp.plan.kv_heads) if world > 1 else None}
    return out, held, isinstance(loaded.model.tp, TPGroup) or world == 1
