"""``mechcliff plot RUN_DIR``: re-render a folder's figures (PDF / SVG / PNG / HTML) from its saved results alone.

The logic lives in :mod:`mechcliff.figures`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from mechcliff.cli.common import Handler


def add_parsers(sub: Any) -> None:
    """Add ``plot`` to ``sub`` (the ``add_subparsers`` object of the ``mechcliff`` parser)."""
    pl = sub.add_parser(
        "plot", help="re-render a run folder's figures as PDF / SVG / PNG / HTML, without the model",
        description="Re-render every figure of RUN_DIR (or the kinds named) from its saved results alone: no model, "
        "no tokenizer, no forward pass. PDF/SVG/PNG need Chrome or Chromium (BROWSER_PATH, /usr/bin/chromium; "
        "`make browser` installs Debian's); without one, HTML is written and the fix is printed.",
    )
    pl.add_argument("run_dir", metavar="RUN_DIR", help="a run folder written by 'mechcliff run' (or any folder of saved results)")
    pl.add_argument("--kind", nargs="*", default=None, metavar="KIND",
                    help="figures or result kinds to draw (space or comma separated); '--kind' alone (or '--kind list') "
                    "lists what RUN_DIR can draw")
    pl.add_argument("--format", default="pdf,svg,png,html", help="comma-separated: pdf, svg, png, html (default: all)")
    pl.add_argument("--style", default="paper", help="paper (two-column paper: 8 pt text, 3.5/7.2 in wide; default) "
                    "or notebook")
    pl.add_argument("--columns", type=int, choices=(1, 2), default=None,
                    help="force the width: 1 = one column (3.5 in), 2 = two columns (7.2 in); default: by content")
    pl.add_argument("--out", default=None, help="folder to write the files to (default: RUN_DIR/figures/STYLE)")


def cmd_plot(args: argparse.Namespace) -> int:
    from mechcliff import figures

    kinds = None if args.kind is None else [k.strip() for v in args.kind for k in v.split(",") if k.strip()]
    if kinds is not None and (not kinds or kinds == ["list"]):
        specs = figures.available(args.run_dir)
        drawable = [s for s in specs.values() if not s.note]
        print(f"{args.run_dir} can draw {len(drawable)} figure(s); select with --kind NAME or --kind RESULT_KIND:")
        for s in specs.values():
            where = ", ".join(f"{r}/" if r != "." else "./" for r in s.sources)
            print(f"  {s.name:28s} {s.kind:20s} from {where}" + (f"  ({s.note})" if s.note else ""))
        return 0
    report = figures.plot_run(args.run_dir, kinds, formats=args.format, style=args.style, out=args.out,
                              columns=args.columns)
    for name, paths in report.files.items():
        print(f"{name}: {', '.join(str(p) for p in paths)}")
    n_figs = sum(1 for p in report.files.values() if p)
    print(f"wrote {report.n_files} file(s) for {n_figs} figure(s), style {args.style}, to {report.out_dir} "
          f"in {report.seconds:.1f} s" + (f" (browser {report.browser})" if report.browser else ""))
    for name, why in report.errors.items():
        print(f"mechcliff: error: could not draw {name}: {why}", file=sys.stderr)
    if report.missing_browser:
        print(f"mechcliff: warning: {figures.no_browser_message()}", file=sys.stderr)
    return 1 if report.errors or report.missing_browser else 0


COMMANDS: dict[str, Handler] = {"plot": cmd_plot}
