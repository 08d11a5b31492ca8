"""Chat fine-tuning: packed windows (what lmops trains on) against one padded example per row.

lmops trains chat data packed: the rendered chats are one token stream with a loss mask (1 on
assistant tokens), and each batch row is a random ``block``-token window that holds at least one
completion token (``lmcore.training.loop.Batches``). The alternative is the Hugging Face collator's:
one example per row, padded to the longest row of its batch (dynamic padding), prompt and padding
masked out of the loss. Both feed the same model (lmcore's ``Transformer``, fp32, AdamW) the same
chats, with the same rows per batch and the same longest row (``block``), in alternating rounds.

The figure that matters is completion tokens trained per second: a padded batch computes its pad
positions for nothing, a packed one computes every position and counts the completion tokens among
them. Reported per variant: positions computed per step, completion tokens per step, their share,
steps/s and completion tokens/s; ``packed_over_padded`` is the ratio of completion tokens/s.

Chats: tinyshakespeare speeches; the user turn asks to continue after one speech, the assistant
turn is the next speech (lengths vary as real chats do), rendered by a ChatML template.

    python bench/packing.py [--json] [--threads N] [--steps 12] [--rounds 3]
"""

from __future__ import annotations

import json
import time

import numpy as np
import torch
import torch.nn.functional as F
from _common import CORPUS, cpu_header, parser, setup, with_cpu

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
          "{% endif %}")
BLOCK, ROWS = 256, 8


def chats(n: int) -> list[list[dict]]:
    speeches = [s.strip() for s in CORPUS.read_text(encoding="utf-8").split("\n\n") if s.strip()]
    return [[{"role": "user", "content": f"Continue the scene after: {a[:300]}"},
             {"role": "assistant", "content": b}] for a, b in zip(speeches[:n], speeches[1 : n + 1], strict=True)]


def encoded(examples: list[list[dict]]) -> list[tuple[list[int], list[int]]]:
    from lmcore.data.tokenizer import Tokenizer

    tok = Tokenizer.train([], "byte")
    tok.chat_template = CHATML
    return [tok.encode_chat(messages) for messages in examples]


def packed_batches(examples: list[tuple[list[int], list[int]]], steps: int):
    from lmcore.training.loop import Batches

    ids = np.concatenate([np.asarray(i, dtype=np.int64) for i, _ in examples])
    mask = np.concatenate([np.asarray(m, dtype=np.uint8) for _, m in examples])
    b = Batches(ids, BLOCK, ROWS, seed=0, device=torch.device("cpu"), mask=mask)
    return [b.get(step) for step in range(steps)]


def padded_batches(examples: list[tuple[list[int], list[int]]], steps: int):
    """Rows of one example each (the last BLOCK + 1 tokens of a longer one: its completion survives),
    right-padded to the batch's longest; targets -1 on prompt and padding."""
    order = np.random.default_rng(0).permutation(len(examples))
    out = []
    for step in range(steps):
        rows = [examples[i] for i in order[step * ROWS : (step + 1) * ROWS]]
        rows = [(ids[-(BLOCK + 1):], m[-(BLOCK + 1):]) for ids, m in rows]
        width = max(len(ids) for ids, _ in rows)
        x = torch.zeros(ROWS, width - 1, dtype=torch.long)
        y = torch.full((ROWS, width - 1), -1, dtype=torch.long)
        for r, (ids, m) in enumerate(rows):
            t = torch.tensor(ids)
            x[r, : len(ids) - 1] = t[:-1]
            y[r, : len(ids) - 1] = t[1:].masked_fill(torch.tensor(m[1:]) == 0, -1)
        out.append((x, y))
    return out


def train_steps(model, opt, batches) -> float:
    """Seconds for one optimizer step per batch."""
    t0 = time.perf_counter()
    for x, y in batches:
        logits, _ = model(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1), ignore_index=-1)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per variant and round")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    setup(args)
    cpu_header()
    from lmcore.model.transformer import ModelConfig, Transformer

    examples = encoded(chats(ROWS * args.steps * args.rounds + 50))
    batches = {"packed": packed_batches(examples, args.steps * args.rounds),
               "padded": padded_batches(examples, args.steps * args.rounds)}
    cfg = ModelConfig(vocab_size=257, n_layer=4, n_head=4, n_kv_head=4, d_model=256, block_size=BLOCK)
    models = {}
    for name in batches:
        torch.manual_seed(0)
        model = Transformer(cfg).train()
        models[name] = (model, torch.optim.AdamW(model.parameters(), lr=3e-4))
        train_steps(*models[name], batches[name][:1])  # warm-up
    seconds = {name: 0.0 for name in batches}
    for r in range(args.rounds):  # alternating, against drift on a shared machine
        for name in (("packed", "padded") if r % 2 == 0 else ("padded", "packed")):
            chunk = batches[name][r * args.steps : (r + 1) * args.steps]
            seconds[name] += train_steps(*models[name], chunk)
    result: dict = {"block": BLOCK, "rows": ROWS, "steps": args.steps * args.rounds, "variants": {}}
    for name, bs in batches.items():
        positions = sum(y.numel() for _, y in bs)
        counted = sum(int((y != -1).sum()) for _, y in bs)
        n = len(bs)
        result["variants"][name] = {
            "positions_per_step": round(positions / n, 1), "completion_tokens_per_step": round(counted / n, 1),
            "completion_share": round(counted / positions, 3), "steps_per_s": round(n / seconds[name], 3),
            "completion_tokens_per_s": round(counted / seconds[name], 1)}
        v = result["variants"][name]
        print(f"{name:>7}: {v['positions_per_step']:>7.0f} positions/step, {v['completion_tokens_per_step']:>7.0f} "
              f"completion tokens/step ({v['completion_share']:.0%}), {v['steps_per_s']:.2f} steps/s, "
              f"{v['completion_tokens_per_s']:.0f} completion tokens/s")
    ratio = result["variants"]["packed"]["completion_tokens_per_s"] / result["variants"]["padded"][
        "completion_tokens_per_s"]
    result["packed_over_padded"] = round(ratio, 2)
    print(f"packed / padded completion tokens per second: {ratio:.2f}x")
    if args.json:
        print(json.dumps(with_cpu(result)))


if __name__ == "__main__":
    main()
