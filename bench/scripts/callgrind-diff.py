#!/usr/bin/env python3
"""Per-request exclusive instruction counts of two callgrind dumps, and where they differ.

    bench/scripts/callgrind-diff.py BASE.out OTHER.out REQUESTS [TOP]

The dumps are what bench/scripts/instructions-per-request.sh prints (one worker each, the same
number of counted requests). Prints each dump's Ir/request by object (the app library, libc,
ld.so), then the TOP functions (default 30) whose count grew most from BASE to OTHER, and
the 10 that shrank most. Inlining differs between builds: compare sums, not single lines.
"""

import collections
import re
import sys

NAMED = re.compile(r"^(c?fn|c?ob|c?fl|fi|fe)=\((\d+)\)(?: (.*))?$")


def exclusive(path):
    """Exclusive Ir by function name, and by object, from one callgrind dump."""
    names, objects, fn_object = {}, {}, {}
    cost = collections.Counter()
    fn = ob = None
    after_calls = False
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            m = NAMED.match(line)
            if m:
                kind, ident, name = m.groups()
                if kind in ("fn", "cfn") and name:
                    names[ident] = name
                if kind in ("ob", "cob") and name:
                    objects[ident] = name
                if kind == "fn":
                    fn = ident
                    fn_object[ident] = ob
                elif kind == "ob":
                    ob = ident
                continue
            if line.startswith("calls="):
                after_calls = True  # the next cost line is the call's inclusive cost
                continue
            if line[:1].isdigit() or line[:1] in "+-*":
                parts = line.split()
                if len(parts) >= 2:
                    if not after_calls:
                        cost[fn] += int(parts[1])
                    after_calls = False
    by_fn = collections.Counter()
    by_object = collections.Counter()
    for ident, c in cost.items():
        by_fn[names.get(ident, ident)] += c
        by_object[objects.get(fn_object.get(ident), "?")] += c
    return by_fn, by_object


def main():
    base_path, other_path, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    top = int(sys.argv[4]) if len(sys.argv) > 4 else 30
    base, base_obj = exclusive(base_path)
    other, other_obj = exclusive(other_path)
    for label, fns, objs in (("base", base, base_obj), ("other", other, other_obj)):
        print(f"{label}: {sum(fns.values()) / n:.0f} Ir/request")
        for obj, c in objs.most_common():
            print(f"  {c / n:8.1f}  {obj}")
    diff = sorted(set(base) | set(other), key=lambda k: other[k] - base[k], reverse=True)
    print("\n   other-base      base     other  function (Ir/request)")
    for k in diff[:top] + ["..."] + diff[-10:]:
        if k == "...":
            print("   ...")
            continue
        print(f"  {(other[k] - base[k]) / n:9.1f} {base[k] / n:9.1f} {other[k] / n:9.1f}  {k[:110]}")


if __name__ == "__main__":
    main()
