"""``airouter rules check`` and ``airouter rules test``: tools for the people who write rules."""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from airouter.core.tags import series_tags
from airouter.core.vocab import Action
from router.engine import SeriesInfo, StudyContext, explain, orientation_of
from router.rules import Rule, RuleError, load_rule_file, load_rules


def _load(path: Path) -> list[Rule]:
    return load_rules(path) if path.is_dir() else load_rule_file(path)


def check(args: argparse.Namespace) -> int:
    """Validate rule files; exit status 0 when valid, 1 with ``file:line: key: error`` lines."""
    try:
        rules = _load(args.path)
    except RuleError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"{args.path}: {len(rules)} rule(s) valid: {', '.join(r.name for r in rules)}")
    return 0


def read_studies(paths: list[Path]) -> tuple[dict[str, list[SeriesInfo]], list[str]]:
    """Headers of DICOM files and folders grouped by study and series; skipped files named."""
    series: dict[tuple[str, str], list[dict]] = defaultdict(list)
    skipped: list[str] = []
    files = [f for p in paths for f in (sorted(p.rglob("*")) if p.is_dir() else [p]) if f.is_file()]
    for f in files:
        try:
            ds = dcmread(f, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, AttributeError) as exc:
            skipped.append(f"{f}: not DICOM ({type(exc).__name__})")
            continue
        study, uid = str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesInstanceUID", ""))
        if not study or not uid:
            skipped.append(f"{f}: no Study/Series Instance UID")
            continue
        series[(study, uid)].append(series_tags(ds))
    studies: dict[str, list[SeriesInfo]] = defaultdict(list)
    for (study, uid), tag_list in sorted(series.items()):
        studies[study].append(SeriesInfo(uid, tag_list[0], len(tag_list)))
    return studies, skipped


def _outputs(rule: Rule) -> str:
    return ", ".join(o.value for o in rule.outputs)


def _series_line(s: SeriesInfo) -> str:
    tags = s.tags
    orientation = orientation_of(tags.get("ImageOrientationPatient"))
    image_type = "\\".join(str(t) for t in tags.get("ImageType") or [])
    return (
        f"  series {s.series_uid}  {tags.get('Modality', '?')}  #{tags.get('SeriesNumber', '')}"
        f"  '{tags.get('SeriesDescription', '')}'  {s.instance_count} instance(s)"
        f"  {orientation.value if orientation else 'no orientation'}  {image_type}"
    )


def test(args: argparse.Namespace) -> int:
    """Dry run: which rules match the given files, what they select and do, and why not."""
    try:
        rules = _load(args.rules)
    except RuleError as exc:
        print(exc, file=sys.stderr)
        return 1
    studies, skipped = read_studies(args.paths)
    for line in skipped:
        print(f"skipped {line}")
    for study, series in studies.items():
        ctx = StudyContext(series, args.calling_ae, args.called_ae, args.source_address)
        print(f"study {study}: {len(series)} series")
        for s in series:
            print(_series_line(s))
        verdicts = explain(ctx, rules, show_identifying=True)  # the author's own files
        for v in verdicts:
            r = v.rule
            if v.matched:
                what = {
                    Action.RUN: f"run {', '.join(r.models)} -> " + _outputs(r),
                    Action.FORWARD: "forward the series as received",
                    Action.DISCARD: "discard the study",
                }[r.action]
                target = f" to {', '.join(r.destinations)}" if r.destinations else ""
                chosen = f" on series {v.series_uid}" if v.series_uid else ""
                print(f"  MATCH {r.name} [{r.priority.value}]: {what}{chosen}{target}")
            elif args.explain:
                print(f"  no    {r.name}: {v.reason}")
        if not any(v.matched for v in verdicts):
            print("  no rule matches: nothing will run")
    return 0


def add_parser(sub: argparse._SubParsersAction, default_rules: Path) -> None:
    """Add ``airouter rules check|test`` to the command's sub-parsers."""
    rules = sub.add_parser("rules", help="check rule files, dry-run them on DICOM files")
    verbs = rules.add_subparsers(dest="verb", required=True)
    c = verbs.add_parser("check", help="validate rule files (exit status 0/1)")
    c.add_argument("path", nargs="?", type=Path, default=default_rules)
    c.set_defaults(func=check)
    t = verbs.add_parser("test", help="which rules would match these DICOM files or folders")
    t.add_argument("paths", nargs="+", type=Path)
    t.add_argument("--rules", type=Path, default=default_rules, help="rule file or folder")
    t.add_argument("--explain", action="store_true", help="say why each other rule did not match")
    t.add_argument("--calling-ae")
    t.add_argument("--called-ae")
    t.add_argument("--source-address")
    t.set_defaults(func=test)
