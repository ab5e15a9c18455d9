"""The ``efpn`` command line."""

from __future__ import annotations

import argparse
import sys

from . import __version__


def _add_summary(sub) -> None:
    p = sub.add_parser("summary", help="print the pyramid of a model and its parameter/FLOP counts")
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--size", type=int, default=800, help="square input side in pixels")
    p.add_argument("--num-classes", type=int, default=91)
    p.add_argument("--sr-module", default="ftt", choices=["ftt", "espcn", "nearest"])
    p.add_argument("--no-baseline", action="store_true", help="skip the FPN baseline row")
    p.set_defaults(func=_cmd_summary)


def _cmd_summary(args) -> int:
    import torch

    from .models import count_flops, count_parameters, efpn_fpn
    from .models.backbone import LEVEL_STRIDES

    torch.manual_seed(0)
    rows = []
    variants = [("EFPN", True)] + ([] if args.no_baseline else [("FPN", False)])
    image = torch.rand(3, args.size, args.size)
    for name, extended in variants:
        model = efpn_fpn(
            args.backbone,
            num_classes=args.num_classes,
            extended=extended,
            sr_module=args.sr_module,
            min_size=args.size,
            max_size=args.size,
        ).eval()
        if extended:
            with torch.no_grad():
                feats = model.backbone(model.transform([image])[0].tensors)
            print(f"{name}-{args.backbone} pyramid at {args.size}x{args.size}:")
            print(f"  {'level':<6}{'stride':>7}  shape")
            for level, t in feats.items():
                stride = LEVEL_STRIDES[level]
                print(f"  {level:<6}{stride:>7}  {tuple(t.shape)}")
        rows.append((name, count_parameters(model), count_flops(model, [image])))
    print(f"\n{'model':<8}{'params (M)':>12}{'GFLOPs':>10}")
    for name, params, flops in rows:
        print(f"{name:<8}{params / 1e6:>12.2f}{flops / 1e9:>10.1f}")
    if len(rows) == 2:
        print(
            f"EFPN/FPN: params x{rows[0][1] / rows[1][1]:.2f}, FLOPs x{rows[0][2] / rows[1][2]:.2f}"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="efpn", description="Extended Feature Pyramid Network for small-object detection"
    )
    parser.add_argument("--version", action="version", version=f"efpn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_summary(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
