"""One prompt decoded once, shared by three sequences that each continue it differently.

    python examples/shared_prefix.py [MODEL]    # a .gguf path or a catalogue name

The prefix goes into sequence 0 once; `seq_cp` gives sequences 1-3 its KV without
recomputing it; one batch then carries the three suffixes, and every later batch one new
token per sequence. Each continuation must match a separate run (prefix + suffix decoded
alone, greedy) - or, where they part, part at a near tie: the token the shared run chose
was within NEAR_TIE of the separate run's top log-probability at that step.

NEAR_TIE = 0.05: on the CPU build both runs compute each row with the same kernels, and
the measured difference of the top-50 log-probabilities over 3 x 24 steps is 0.0 (printed
below as `drift`), so the continuations are identical. Other builds (GPU, other SIMD
paths) may use a different kernel for a 3-row batch than for 1 row and differ by about
1e-3; 0.05 leaves room for that, while a real error (a wrong position, a KV cell not
shared, a missing suffix token) moves log-probabilities by far more. Near ties are real:
the closest top-1/top-2 gap in these runs is about 0.005.
"""

from __future__ import annotations

import os
import sys

from llama_crab.lowlevel import Batch, Context, Model
from llama_crab.models import DEFAULT_MODEL, ensure

PREFIX = "Here are three short facts about the ocean:"
SUFFIXES = (" First,", " The deepest point", " Most of the")
MAX_TOKENS = 24
N_SEQ_CTX = 512  # positions per sequence, the same in both runs
NEAR_TIE = 0.05
TOP = 50
N_THREADS = os.cpu_count() or 1

Step = dict[int, float]  # top log-probabilities: token -> logprob


def greedy(logprobs: Step) -> int:
    return max(logprobs, key=lambda t: (logprobs[t], -t))


def separate_run(model: Model, tokens: list[int]) -> tuple[list[int], list[Step]]:
    """Greedy continuation of tokens alone in a context of one sequence."""
    out: list[int] = []
    steps: list[Step] = []
    with Context(model, n_ctx=N_SEQ_CTX, n_threads=N_THREADS) as ctx:
        batch = Batch(len(tokens))
        batch.add_tokens(tokens)
        ctx.decode(batch)
        pos = len(tokens)
        while len(out) < MAX_TOKENS:
            step = dict(ctx.logprobs(-1, TOP))
            token = greedy(step)
            if model.is_eog(token):
                break
            out.append(token)
            steps.append(step)
            batch.clear()
            batch.add(token, pos, 0, logits=True)
            ctx.decode(batch)
            pos += 1
    return out, steps


def shared_run(model: Model, prefix: list[int], suffixes: list[list[int]]) -> tuple[list[list[int]], list[list[Step]]]:
    """The prefix once in sequence 0, copied to 1..n, each continued in the same batches."""
    n = len(suffixes)
    seqs = list(range(1, n + 1))
    outs: list[list[int]] = [[] for _ in seqs]
    steps: list[list[Step]] = [[] for _ in seqs]
    with Context(model, n_ctx=N_SEQ_CTX * (n + 1), n_seq_max=n + 1, n_threads=N_THREADS) as ctx:
        batch = Batch(max(len(prefix), sum(map(len, suffixes))))
        batch.add_tokens(prefix, pos=0, seq_id=0, logits_last=False)
        ctx.decode(batch)
        for seq in seqs:
            ctx.seq_cp(0, seq)  # shares the prefix's KV, nothing recomputed
        batch.clear()
        rows: dict[int, int] = {}  # sequence -> its batch position with logits
        for seq, suffix in zip(seqs, suffixes):
            batch.add_tokens(suffix, pos=len(prefix), seq_id=seq, logits_last=True)
            rows[seq] = len(batch) - 1
        ctx.decode(batch)
        pos = {seq: len(prefix) + len(suffix) for seq, suffix in zip(seqs, suffixes)}
        while rows:
            batch.clear()
            next_rows: dict[int, int] = {}
            for seq, row in rows.items():
                step = dict(ctx.logprobs(row, TOP))
                token = greedy(step)
                out = outs[seq - 1]
                if model.is_eog(token):
                    continue
                out.append(token)
                steps[seq - 1].append(step)
                if len(out) < MAX_TOKENS:
                    batch.add(token, pos[seq], seq, logits=True)
                    next_rows[seq] = len(batch) - 1
                    pos[seq] += 1
            rows = next_rows
            if rows:
                ctx.decode(batch)
    return outs, steps


def check(name: str, mine: list[int], ref: list[int], ref_steps: list[Step]) -> str:
    """'' if mine matches ref (or parts from it at a near tie), else why not."""
    for j, (a, b) in enumerate(zip(mine, ref)):
        if a != b:
            gap = ref_steps[j][b] - ref_steps[j].get(a, float("-inf"))
            if gap <= NEAR_TIE:
                print(f"  {name}: parts at step {j} at a near tie (gap {gap:.4f} <= {NEAR_TIE})")
                return ""
            return f"{name}: step {j}: token {a} where the separate run has {b} (logprob gap {gap:.4f})"
    if len(mine) != len(ref):
        return f"{name}: {len(mine)} tokens where the separate run has {len(ref)}"
    return ""


def main() -> None:
    path = ensure(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_MODEL)
    with Model.load(path) as model:
        prefix = model.tokenize(PREFIX)
        suffixes = [model.tokenize(s, add_special=False) for s in SUFFIXES]
        refs = [separate_run(model, prefix + suffix) for suffix in suffixes]
        outs, steps = shared_run(model, prefix, suffixes)

        drift = 0.0
        problems = []
        for i, suffix_text in enumerate(SUFFIXES):
            ref, ref_steps = refs[i]
            print(f"{PREFIX}{suffix_text}|{model.detokenize(outs[i])!r}")
            problems.append(check(f"sequence {i + 1}", outs[i], ref, ref_steps))
            for j in range(min(len(outs[i]), len(ref))):
                if outs[i][: j + 1] != ref[: j + 1]:
                    break
                common = steps[i][j].keys() & ref_steps[j].keys()
                drift = max([drift, *(abs(steps[i][j][t] - ref_steps[j][t]) for t in common)])
        print(f"drift (largest top-{TOP} logprob difference before any parting): {drift:.6f}")
        problems = [p for p in problems if p]
        assert not problems, "; ".join(problems)
        print(f"OK: {len(SUFFIXES)} continuations of one shared prefix match their separate runs")


if __name__ == "__main__":
    main()
