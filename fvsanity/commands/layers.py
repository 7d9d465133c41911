"""``fvsanity layers MODEL``: list hookable layers with their output shapes."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("layers", help="list a model's layers and output shapes", description=__doc__)
    p.add_argument("model", nargs="?", default="cifar10-resnet20", help="model name [%(default)s]")
    p.add_argument("--weights", default=None, help="local weights file")
    p.add_argument("--random-weights", action="store_true", help="do not look for weights")
    p.add_argument("--list", action="store_true", help="list registered model names instead")
    p.add_argument("--blocks", action="store_true", help="only the block outputs (the comparison path)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..models import list_models, load_model
    from ..units import describe_layers

    if args.list:
        for name in list_models():
            print(name)
        print("(also: any torchvision model name, or timm:NAME)")
        return 0
    lm = load_model(args.model, weights=args.weights, pretrained=not args.random_weights)
    rows = describe_layers(lm)
    if args.blocks:
        rows = [r for r in rows if r[0] in lm.block_layers]
    width = max(len(r[0]) for r in rows)
    print(f"{'layer':<{width}}  {'type':<18} output (C, H, W)   [model {lm.name}, input {lm.input_size}]")
    for name, typ, shape in rows:
        mark = " *" if name in lm.block_layers else ""
        lay = lm.layer_info(name).layout
        note = f"  tokens: {lay.prefix_tokens} prefix + grid {lay.grid}, D={lay.channels}" if lay.kind == "tokens" else ""
        print(f"{name:<{width}}  {typ:<18} {tuple(shape)}{mark}{note}")
    print("* block output (default comparison path); units: LAYER:CHANNEL or LAYER:CHANNEL@Y,X")
    return 0
