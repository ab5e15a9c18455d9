"""``efpn config``: the resolved recipe with a comment on every key, and the reference."""

from __future__ import annotations

from .train import add_override_args


def _add_config(sub) -> None:
    p = sub.add_parser("config", help="show a resolved recipe with a comment on every key")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    s = csub.add_parser("show", help="the full resolved recipe, one comment per key")
    s.add_argument("--config", default=None, help="recipe (default: every key's default)")
    add_override_args(s, "recipe overrides")
    s.set_defaults(func=_cmd_config_show)
    d = csub.add_parser("docs", help="print docs/config.md (the reference in Markdown)")
    d.set_defaults(func=_cmd_config_docs)


def format_recipe(
    values: dict, helps: dict[str, str], prefix: str = "", indent: int = 0
) -> list[str]:
    """YAML lines of a recipe with each key's meaning as a trailing comment."""
    import yaml

    lines = []
    pad = "  " * indent
    for key, value in values.items():
        dotted = prefix + key
        if isinstance(value, dict):
            lines.append(f"{pad}{key}:")
            lines += format_recipe(value, helps, dotted + ".", indent + 1)
            continue
        text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
        text = text.removesuffix("\n...").removesuffix("...").strip()
        comment = helps.get(dotted, "")
        lines.append(f"{pad}{key}: {text}" + (f"  # {comment}" if comment else ""))
    return lines


def _cmd_config_show(args) -> int:
    from ..config import load_config
    from ..config_docs import key_help
    from .train import override_pairs, parse_overrides

    cfg = load_config(args.config, parse_overrides(override_pairs(args)))
    print("\n".join(format_recipe(cfg.to_dict(), key_help())))
    return 0


def _cmd_config_docs(args) -> int:
    from ..config_docs import render_markdown

    print(render_markdown(), end="")
    return 0


def register(sub) -> None:
    """Add ``efpn config`` to the ``efpn`` subparsers."""
    _add_config(sub)
