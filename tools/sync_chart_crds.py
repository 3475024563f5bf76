"""Copy the generated CRDs (``crds/*.yaml``) into the Helm chart (``deploy/helm/gpu-fleet/crds/``).

Helm installs whatever sits in a chart's ``crds/`` folder before the templates, so the chart must
ship byte-identical copies of the generated files.  Run after regenerating the CRDs::

    python tools/sync_chart_crds.py          # copy; stale chart copies are removed
    python tools/sync_chart_crds.py --check  # exit 1 and list the differences, change nothing

``tests/deploy/test_helm_chart.py`` runs the check, so a forgotten sync fails the tests.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "crds"
TARGET = ROOT / "deploy" / "helm" / "gpu-fleet" / "crds"
PATTERNS = ("*.yaml", "*.yml")


def _manifests(folder: Path) -> dict[str, bytes]:
    if not folder.is_dir():
        return {}
    return {
        path.name: path.read_bytes()
        for pattern in PATTERNS
        for path in sorted(folder.glob(pattern))
        if path.is_file()
    }


def differences(source: Path = SOURCE, target: Path = TARGET) -> list[str]:
    """What a sync would change, one line per file; empty when the chart is up to date."""
    want, have = _manifests(source), _manifests(target)
    out = [f"missing in chart: {name}" for name in sorted(want.keys() - have.keys())]
    out += [f"stale in chart (no source): {name}" for name in sorted(have.keys() - want.keys())]
    out += [
        f"differs: {name}" for name in sorted(want.keys() & have.keys()) if want[name] != have[name]
    ]
    return out


def sync(source: Path = SOURCE, target: Path = TARGET) -> list[str]:
    """Make ``target`` hold exactly the CRD manifests of ``source``; returns what changed."""
    changes = differences(source, target)
    if not changes:
        return []
    target.mkdir(parents=True, exist_ok=True)
    want = _manifests(source)
    for name in _manifests(target).keys() - want.keys():
        (target / name).unlink()
    for name in want:
        shutil.copyfile(source / name, target / name)
    return changes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report differences, change nothing")
    parser.add_argument("--source", type=Path, default=SOURCE)
    parser.add_argument("--target", type=Path, default=TARGET)
    args = parser.parse_args(argv)
    if args.check:
        diffs = differences(args.source, args.target)
        for line in diffs:
            print(line)
        if diffs:
            print("run: python tools/sync_chart_crds.py", file=sys.stderr)
            return 1
        print(f"chart CRDs up to date ({len(_manifests(args.source))} files)")
        return 0
    changes = sync(args.source, args.target)
    for line in changes:
        print(line)
    print(f"chart CRDs synced ({len(_manifests(args.source))} files, {len(changes)} changed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
