"""Training-step throughput of every model on this machine's CPU.

One step = encode a batch of b (image, caption) pairs, score the b x b matrix, hardest-negative
triplet loss, backward, gradient clipping, Adam step -- what the trainer's inner loop does. Two
size settings: the Scenes demo recipe's dimensions (what `make demo` trains) and the papers'
(D=1024, S=256, 36 x 2048 regions), with batch 128 captions of length 8-23.

On CUDA, the trainer runs the same step under autocast (bf16, or fp16 with a GradScaler) and
never syncs with the host inside the loop; to benchmark a GPU, run this script with
``--device cuda --amp bf16`` on the GPU machine.
"""
from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import Any

import torch
import yaml

from thsrn_lib.losses import ContrastiveLoss
from thsrn_lib.models import create
from thsrn_lib.notebook_utils import model_options

from .common import format_table, random_captions, save_results, time_call

REPO = Path(__file__).resolve().parents[1]

# "demo": each model's Scenes demo recipe (configs/scenes_demo_<model>.yaml: its model_config on
# the demo data's sizes); "paper": the papers' sizes.
SIZES = {
    "demo": dict(img_dim=256, num_regions=16, vocab_size=76),
    "paper": dict(img_dim=2048, num_regions=36, embed_size=1024, sim_dim=256, word_dim=300, vocab_size=8481),
}
# Paper batch 128 is a GPU setting: a TSHSR step at the papers' sizes then holds > 24 GB of
# activations, more than a CPU machine like ours has, so on a CPU the paper size uses 32.
BATCH = {"demo": 32, "paper": 128}
CPU_PAPER_BATCH = 32


def _recipe_model_config(name: str) -> dict[str, Any]:
    recipe = REPO / "configs" / f"scenes_demo_{name}.yaml"
    return dict(yaml.safe_load(recipe.read_text(encoding="utf-8")).get("model_config") or {})


def make_batch(size: dict[str, int], b: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(b, size["num_regions"], size["img_dim"], generator=g).abs()
    ids, lengths = random_captions(b, size["vocab_size"], g)
    return feats, ids, lengths


def bench(name: str, size_name: str, batch: int, device: str, amp: str, repeat: int) -> dict[str, Any]:
    size = SIZES[size_name]
    torch.manual_seed(0)
    options = {**size, **(_recipe_model_config(name) if size_name == "demo" else {})}
    model = create(name, **model_options(name, options)).to(device).train()  # the options the model has
    opt = torch.optim.Adam(model.parameters(), lr=2e-4)
    loss_fn = ContrastiveLoss(0.2)
    feats, ids, lengths = (t.to(device) for t in make_batch(size, batch))
    index = torch.arange(batch, device=device)
    # The ranking loss on the model's scores (HJE's extra local-label loss is a b x b MSE: negligible).
    crit = lambda m: loss_fn(m(feats, ids, lengths), index)  # noqa: E731
    autocast = (
        torch.autocast(device_type="cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
        if device.startswith("cuda") and amp != "off"
        else contextlib.nullcontext()
    )

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = crit(model)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        opt.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    seconds = time_call(step, repeat=repeat, warmup=1)
    return {
        "model": name,
        "size": size_name,
        "batch": batch,
        "step_s": seconds,
        "samples_per_s": batch / seconds,
        "pairs_per_s": batch * batch / seconds,
        "params_m": model.num_parameters() / 1e6,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models", nargs="+", default=["tshsr", "sgr", "saf", "shan", "hje"])
    p.add_argument("--sizes", nargs="+", default=["demo", "paper"], choices=sorted(SIZES))
    p.add_argument("--batch", type=int, default=None,
                   help="captions per step (default: 32 demo; paper 128 on CUDA, 32 on a CPU)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", default="bf16", choices=["bf16", "fp16", "off"])
    p.add_argument("--repeat", type=int, default=2)
    args = p.parse_args(argv)
    def batch_for(size: str) -> int:
        if args.batch:
            return args.batch
        return CPU_PAPER_BATCH if size == "paper" and not args.device.startswith("cuda") else BATCH[size]

    rows = [bench(m, s, batch_for(s), args.device, args.amp, args.repeat) for s in args.sizes for m in args.models]
    print(format_table(rows, [
        ("model", "model", "s"), ("size", "size", "s"), ("batch", "batch", "d"), ("params_m", "params (M)", ".2f"),
        ("step_s", "s/step", ".3f"), ("samples_per_s", "samples/s", ".1f"), ("pairs_per_s", "scored pairs/s", ".0f"),
    ]))
    result = {"config": vars(args), "rows": rows}
    save_results("training", result)
    return result


if __name__ == "__main__":
    main()
