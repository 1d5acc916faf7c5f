"""Train the tiny chat model on corpus.txt and write its weights (two to three minutes on one CPU core).

    python examples/tiny-chat/train.py                        # writes examples/tiny-chat/weights.safetensors
    python examples/tiny-chat/train.py --output /tmp/w.safetensors --steps 300

corpus.txt holds blocks separated by blank lines: short dialogues (`user: ...` / `assistant: ...`,
the format `chat` prompts with) and a few paragraphs of prose. Each block ends with the end-of-turn
token, which teaches the model to stop. Training samples random windows of the whole text; the seed
is fixed. The weights are saved in float16 (the predictor computes in float32), without the output
layer, which is tied to the token embedding.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from predictor import CONTEXT, END, WEIGHTS, build_model, encode  # noqa: E402
from safetensors.torch import save_file  # noqa: E402


def corpus_tokens(path: Path) -> list[int]:
    tokens: list[int] = []
    for block in path.read_text().split("\n\n"):
        if block.strip():
            tokens += [*encode(block.strip()), END]
    return tokens


def train(output: Path, steps: int, seed: int = 0) -> float:
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    data = torch.tensor(corpus_tokens(HERE / "corpus.txt"))
    window, batch = min(128, CONTEXT), 32
    model = build_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    model.train()
    final = 0.0
    for _ in range(steps):
        starts = torch.randint(0, len(data) - window - 1, (batch,))
        inputs = torch.stack([data[s : s + window] for s in starts.tolist()])
        loss = model(inputs, labels=inputs).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        final = loss.item()
    weights = {k: v.detach().half().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    output.parent.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(output))
    return final


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=WEIGHTS)
    parser.add_argument("--steps", type=int, default=1500)
    args = parser.parse_args()
    started = time.perf_counter()
    loss = train(args.output, args.steps)
    elapsed = time.perf_counter() - started
    print(f"trained {args.steps} steps in {elapsed:.0f} s, final loss {loss:.3f}: {args.output}")


if __name__ == "__main__":
    main()
