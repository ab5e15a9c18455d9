"""``efpn study``: paired FPN-vs-EFPN experiments over seeds and folds."""

from __future__ import annotations


def _add_study(sub) -> None:
    p = sub.add_parser(
        "study",
        help="paired FPN vs EFPN runs over seeds (and folds), with 95%% intervals",
        description=(
            "Each run trains stage 1 once and checks the premise (FPN at S and 2S); every "
            "arm trains stages 2-3 from that checkpoint, so its difference to FPN 1x is "
            "paired. Resumes: finished runs are skipped. Presets: efpn, ext_only, espcn, "
            "ftt (Table II), lambda0, no_ftt_loss (Table IV), cheap_widths, and the inference-only "
            "duplicate, gated, fused (how small RoIs are merged), and fpn_longer (the FPN "
            "trained on from its checkpoint for as many epochs as stages 2-3: a control for "
            "EFPN's extra training, at S only; fpn_longer_x2: twice as many; fpn_longer_ms: over "
            "the recipe's scale jitter, so it stays a teacher at 2S), and efpn_longer, "
            "fused_longer (EFPN trained on fpn_longer's FPN: paired with fpn_longer, what the "
            "extension adds to the same FPN; efpn_longer_ms, fused_longer_ms: on fpn_longer_ms's; "
            "a custom arm takes start=fpn_longer); groups table2, table4, cheap, merge."
        ),
    )
    p.add_argument("--config", required=True, help="YAML recipe")
    p.add_argument("--seeds", type=int, default=3, help="training seeds per fold (default 3)")
    p.add_argument(
        "--folds",
        type=int,
        default=0,
        help="K >= 2: K deterministic folds over train+val (small data); 0: the recipe's split",
    )
    p.add_argument(
        "--arm",
        nargs="+",
        action="append",
        metavar="NAME [key=value]",
        help="an arm: a preset or group name, or a name with config overrides "
        "(e.g. --arm lam05 distill.lam=0.5); repeatable; default: efpn",
    )
    p.add_argument("--out", required=True, help="study folder (resumes when it exists)")
    p.add_argument(
        "--test",
        default=None,
        metavar="RECIPE",
        help="a YAML recipe whose val split is a held-out test set: every row is also "
        "evaluated there (val selects each stage's best epoch, so it is not held out)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="recipe override for every run and arm, e.g. --set stage1.optim.epochs=3 (repeatable)",
    )
    p.set_defaults(func=_cmd_study)


def _cmd_study(args) -> int:
    from ..study import run_study
    from .train import parse_overrides

    run_study(
        args.config,
        seeds=args.seeds,
        folds=args.folds,
        arms=args.arm,
        out=args.out,
        quiet=args.quiet,
        overrides=parse_overrides(args.set),
        test=args.test,
    )
    return 0


def register(sub) -> None:
    """Add ``efpn study`` to the ``efpn`` subparsers."""
    _add_study(sub)
