import random, sys, time, json
from genfuse.runtime.loader import load_model
from genfuse.runtime.threads import kernel_threads, set_threads
from genfuse.runtime.engine import Engine
from genfuse.runtime.sampling import SamplingParams
loaded = load_model("smollm2-135m-instruct")
set_threads(kernel_threads(), torch_threads=1)
rng = random.Random(0); V = loaded.config.vocab_size
reqs = [([rng.randrange(V) for _ in range(rng.randrange(16, 513))], rng.randrange(16, 257)) for _ in range(64)]
out = {}
for mode, kw in (("engine", {}), ("one_at_a_time", {"max_num_seqs": 1})):
    e = Engine(loaded, **kw)
    e.add_request("w", reqs[0][0][:16], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    while e.has_unfinished_requests(): e.step()
    for i, (p, n) in enumerate(reqs):
        e.add_request(str(i), p, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
    agg = {"decode_only": [0, 0.0, 0, 0], "with_prefill": [0, 0.0, 0, 0]}
    t0 = time.perf_counter()
    while e.has_unfinished_requests():
        ts = time.perf_counter(); e.step(); dt = time.perf_counter() - ts
        st = e.last_step
        k = "decode_only" if st.num_tokens == st.num_seqs else "with_prefill"
        a = agg[k]; a[0] += 1; a[1] += dt; a[2] += st.num_tokens; a[3] += st.num_seqs
    total = time.perf_counter() - t0
    out[mode] = {"total_s": total, **{k: dict(steps=v[0], seconds=v[1], tokens=v[2], seqs=v[3]) for k, v in agg.items()}}
    print(mode, json.dumps(out[mode]), flush=True)
json.dump(out, open(sys.argv[1], "w"), indent=1)
