#!/usr/bin/env python3
"""Import cycles between a crate's modules: `scripts/module-cycles.py loadtest/src [src …]`.

Reads every .rs file under each source root, maps it to its module path (`a/b.rs` and
`a/b/mod.rs` are `a::b`; `lib.rs`/`main.rs` are the crate root), and collects the modules each
file names through `crate::…`, `super::…` and `self::…` paths (in `use` lines and inline). A
path names the longest module prefix that exists. Edges from a module to its own descendants or
ancestors (the `mod` tree, `use super::*` in tests) and edges from or to the crate root (it
declares and re-exports everything) are not counted. Prints each cycle (strongly connected
component of two or more modules) and exits 1 if there is one, 0 if not.
"""
import pathlib
import re
import sys

PATH = re.compile(r"\b(crate|super|self)((?:::[A-Za-z_][A-Za-z0-9_]*|::\{)+)")


def module_of(root, file):
    rel = file.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "mod":
        parts.pop()
    if parts in (["lib"], ["main"]):
        return ()
    return tuple(parts)


def strip_comments(text):
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def group_paths(text, start):
    """The paths inside a `{…}` group starting at text[start] == '{'."""
    depth, i, cur, out = 0, start, "", []
    while i < len(text):
        c = text[i]
        if c == "{":
            depth += 1
            if depth > 1:
                cur += c
        elif c == "}":
            depth -= 1
            if depth == 0:
                out.append(cur)
                break
            cur += c
        elif c == "," and depth == 1:
            out.append(cur)
            cur = ""
        elif depth >= 1:
            cur += c
        i += 1
    paths = []
    for p in out:
        p = p.strip()
        m = re.match(r"([A-Za-z_][A-Za-z0-9_]*(?:::[A-Za-z_][A-Za-z0-9_]*)*)(::\{)?", p)
        if not m:
            continue
        head = m.group(1).split("::")
        if m.group(2):
            for sub in group_paths(p, p.index("{")):
                paths.append(head + sub)
        else:
            paths.append(head)
    return paths


def referenced(text):
    """(anchor, [segments]) for every crate/super/self path in the text."""
    for m in PATH.finditer(text):
        anchor, rest = m.group(1), m.group(2)
        segs = [s for s in rest.split("::") if s]
        if segs and segs[-1] == "{":
            head = segs[:-1]
            brace = m.end() - 1
            for sub in group_paths(text, brace):
                yield anchor, head + sub
        else:
            yield anchor, segs


def resolve(modules, here, anchor, segs):
    if anchor == "crate":
        base = ()
    elif anchor == "self":
        base = here
    else:  # super: a `mod.rs` file's parent is one level up from its own module
        base = here[:-1] if here else ()
        while segs and segs[0] == "super":
            base, segs = base[:-1], segs[1:]
    best = base
    for i in range(1, len(segs) + 1):
        cand = base + tuple(segs[:i])
        if cand in modules:
            best = cand
        else:
            break
    return best


def related(a, b):
    return a[: len(b)] == b or b[: len(a)] == a


def sccs(graph):
    index, low, stack, on, out, n = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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
            out.append(comp)

    sys.setrecursionlimit(10000)
    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def check(root):
    root = pathlib.Path(root)
    files = {f: module_of(root, f) for f in sorted(root.rglob("*.rs"))}
    modules = set(files.values())
    graph, why = {m: set() for m in modules}, {}
    for f, here in files.items():
        if here == ():
            continue
        text = strip_comments(f.read_text())
        for anchor, segs in referenced(text):
            to = resolve(modules, here, anchor, segs)
            if to == () or related(here, to):
                continue
            graph[here].add(to)
            why.setdefault((here, to), f"{f}: {anchor}::{'::'.join(segs)}")
    cycles = [sorted(c) for c in sccs(graph) if len(c) > 1]
    name = lambda m: "::".join(m)
    for c in cycles:
        print(f"{root}: cycle between {', '.join(name(m) for m in c)}")
        members = set(c)
        for a in c:
            for b in sorted(graph[a] & members):
                print(f"    {name(a)} -> {name(b)}   ({why[(a, b)]})")
    edges = sum(len(v) for v in graph.values())
    print(f"{root}: {len(modules) - (() in modules)} modules, {edges} import edges, {len(cycles)} cycle(s)")
    return bool(cycles)


if __name__ == "__main__":
    roots = sys.argv[1:] or ["src"]
    sys.exit(1 if any([check(r) for r in roots]) else 0)
