"""Quality against training cost for several runs: report.png (quality vs device-hours and vs images seen) and
report.md (a table), from each run's in-training quality rows and <run>/eval/*.json metrics files.

    python -m maskdit_ds report runs/digits runs/digits_aligned --out reports/
    python -m maskdit_ds report masked=runs/m_s0 masked=runs/m_s1 aligned=runs/a_s0 aligned=runs/a_s1   # seeds
"""
import argparse
import sys
from pathlib import Path

from . import command, parser


def parse(argv=None) -> argparse.Namespace:
    p = parser("report", __doc__)
    p.add_argument("runs", nargs="+", metavar="[LABEL=]RUN", help="run directories; runs sharing a LABEL are "
                   "averaged (seeds of one configuration)")
    p.add_argument("--metric", default="auto", help="stats key to plot: fid, digits_class_agreement "
                   "(auto: fid where runs have it)")
    p.add_argument("--out", default=".", help="folder for report.png and report.md")
    return p.parse_args(argv)


@command
def main(argv=None) -> int:
    args = parse(argv)
    from ..evaluation.report import report

    png, md, text = report(args.runs, Path(args.out), args.metric)
    print(text)
    print(f"wrote {png} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
