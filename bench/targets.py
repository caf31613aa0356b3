"""One line per target from the benches' JSON files in a results folder: figure, target, met or not
(bench/gpu.sh ends with this; it also writes RESULTS_DIR/targets.md).

    python bench/targets.py RESULTS_DIR kernel train_step sample fid

A bench named but without a JSON file (not run, cut short before its first result, failed) gets a line
saying so; a target the bench could not measure says "not measured".
"""
import argparse
import json
import os
import sys


def target_lines(folder, benches):
    """[(bench, name, figure text, target, verdict)] in the order of `benches` and of each file's targets."""
    lines = []
    for bench in benches:
        path = os.path.join(folder, f"{bench}.json")
        try:
            with open(path) as f:
                targets = json.load(f).get("targets")
        except FileNotFoundError:
            lines.append((bench, "(all targets)", "–", "–", f"no results: {bench}.json was not written"))
            continue
        except (OSError, ValueError) as e:
            lines.append((bench, "(all targets)", "–", "–", f"unreadable {bench}.json: {e}"))
            continue
        if not targets:
            lines.append((bench, "(all targets)", "–", "–", "no targets in its JSON"))
            continue
        for t in targets:
            figure = "–" if t.get("figure") is None else f"{t['figure']:.3g} {t.get('unit', '')}".rstrip()
            verdict = {True: "met", False: "NOT met", None: "not measured"}[t.get("met")]
            lines.append((bench, t.get("name", "?"), figure, t.get("target", "?"), verdict))
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="the results folder holding BENCH.json files")
    p.add_argument("benches", nargs="+", help="bench names (file stems), in the order to report them")
    args = p.parse_args()
    lines = target_lines(args.folder, args.benches)
    with open(os.path.join(args.folder, "targets.md"), "w") as f:
        f.write("| bench | target | figure | goal | verdict |\n|---|---|---|---|---|\n")
        f.writelines(f"| {' | '.join(line)} |\n" for line in lines)
    for bench, name, figure, goal, verdict in lines:
        print(f"{bench}: {name}: {figure} (target {goal}): {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
