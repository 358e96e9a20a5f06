#!/usr/bin/env python3
"""Fails when the top-level modules of a crate import each other in a cycle.

    scripts/module-cycles.py crates/apiserver/src [crates/agent/src ...]

A module is a file or directory directly under `src/`; an edge A -> B is any `crate::B` path
written in A's files (in `use` lists too). Prints each crate's module graph, then every cycle
found (Tarjan's strongly connected components); exits 1 if there is one. The crate root
(lib.rs, main.rs) is left out: it declares every module and depends on all of them.
"""
import re
import sys
from pathlib import Path

PATH = re.compile(r"\bcrate::(\{[^}]*\}|[a-z_][a-z0-9_]*)", re.S)


def module_of(src: Path, file: Path):
    rel = file.relative_to(src)
    if len(rel.parts) == 1:
        name = rel.stem
        return None if name in ("lib", "main") else name
    return rel.parts[0]


def targets(text: str):
    for m in PATH.finditer(text):
        group = m.group(1)
        if group.startswith("{"):
            for part in group[1:-1].split(","):
                head = part.strip().split("::")[0].strip()
                if head:
                    yield head
        else:
            yield group


def graph(src: Path):
    modules = {module_of(src, f) for f in src.rglob("*.rs")} - {None}
    edges = {m: set() for m in modules}
    for f in src.rglob("*.rs"):
        a = module_of(src, f)
        if a is None:
            continue
        # Comments may name paths without depending on them.
        text = "\n".join(l.split("//")[0] for l in f.read_text().splitlines())
        for b in targets(text):
            if b in modules and b != a:
                edges[a].add(b)
    return edges


def cycles(edges):
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def main():
    failed = False
    for arg in sys.argv[1:]:
        src = Path(arg)
        edges = graph(src)
        print(f"{src}:")
        for a in sorted(edges):
            print(f"  {a} -> {', '.join(sorted(edges[a])) or '(nothing)'}")
        for c in cycles(edges):
            failed = True
            print(f"  CYCLE: {' <-> '.join(c)}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
