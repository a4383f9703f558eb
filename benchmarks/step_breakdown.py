"""Where a serving step's time goes on the GPU: engine step time in-process at a steady decode batch,
split into schedule / forward+sample / outputs (cProfile top entries). Used to explain sim-vs-real gaps."""
import cProfile
import pstats
import sys
import time

from tandem import LLM, SamplingParams

model = sys.argv[1]
llm = LLM(model, device="cuda", max_num_seqs=256, max_num_batched_tokens=2048)
eng = llm.engine
for bs in (1, 8, 40):
    prompts = [[(7 * i + j) % 5000 + 10 for j in range(1000)] for i in range(bs)]
    for i, p in enumerate(prompts):
        eng.add_request(f"b{bs}-{i}", p, SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in eng.requests.values()):
        eng.step()
    for _ in range(20):
        eng.step()
    t = time.perf_counter()
    n = 100
    pr = cProfile.Profile() if bs == 40 else None
    if pr:
        pr.enable()
    for _ in range(n):
        eng.step()
    if pr:
        pr.disable()
    dt = (time.perf_counter() - t) / n
    print(f"batch {bs}: in-process decode step {dt * 1e3:.2f} ms{' (under cProfile)' if pr else ''}")
    if pr:
        pstats.Stats(pr).sort_stats("tottime").print_stats(18)
    while eng.has_unfinished_requests():
        eng.step()
