//! The shape of `src/`: imports point down the layers and never loop.
//!
//! Reads every library source file, finds what each module imports (`use` trees and
//! `crate::`/`super::` paths outside `#[cfg(test)]` modules), and fails on an import from a
//! higher layer or on any cycle between modules, naming the files involved.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level modules, lowest first; a module may import from its own layer or lower ones.
const LAYERS: &[(&str, u8)] = &[
    ("proto", 0),
    ("shutdown", 0),
    ("wheel", 0),
    ("config", 1),
    ("ws", 2),
    ("core", 3),
    ("bus", 4),
    ("error", 5),
    ("conn", 5),
    ("http", 6),
    ("server", 7),
];

fn layer(module: &str) -> Option<u8> {
    let top = module.split("::").next()?;
    LAYERS.iter().find(|(n, _)| *n == top).map(|(_, l)| *l)
}

/// `src/a/b.rs` → `a::b`; `src/a/mod.rs` → `a`; `src/lib.rs` → `` (the crate root).
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).expect("under src");
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().expect("a file name");
    let stem = last.trim_end_matches(".rs");
    if stem != "mod" && stem != "lib" {
        parts.push(stem.to_owned());
    }
    parts.join("::")
}

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("readable src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of a file without comments and without its `#[cfg(test)]` modules (kept at the end).
fn code(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod ") {
        Some(i) => &text[..i],
        None => text,
    };
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every path a `use` tree names, expanded: `a::{b, c::{d, self}}` → `a::b`, `a::c::d`, `a::c`.
fn expand(tree: &str) -> Vec<String> {
    let tree: String = tree.chars().filter(|c| !c.is_whitespace()).collect();
    let Some(open) = tree.find('{') else {
        return vec![tree.split(" as ").next().unwrap_or(&tree).to_owned()];
    };
    let prefix = tree[..open].trim_end_matches("::");
    let inner = &tree[open + 1..tree.len().saturating_sub(1)];
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&inner[start..]);
    parts
        .into_iter()
        .filter(|p| !p.is_empty())
        .flat_map(expand)
        .map(|p| match p.as_str() {
            "self" => prefix.to_owned(),
            _ => format!("{prefix}::{p}"),
        })
        .collect()
}

/// The module a path names, resolved against the known modules (longest known prefix).
fn resolve(path: &str, here: &str, modules: &BTreeSet<String>) -> Option<String> {
    let mut segs: Vec<&str> = path.split("::").collect();
    let mut base: Vec<String> = match segs.first() {
        Some(&"crate") => {
            segs.remove(0);
            Vec::new()
        }
        Some(&"super") => {
            let mut b: Vec<String> = here.split("::").map(str::to_owned).collect();
            while segs.first() == Some(&"super") {
                segs.remove(0);
                b.pop();
            }
            b.retain(|s| !s.is_empty());
            b
        }
        Some(&"self") => {
            segs.remove(0);
            here.split("::")
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        }
        // A child module of this one, named without `self::`.
        Some(first) => {
            let child = if here.is_empty() {
                (*first).to_owned()
            } else {
                format!("{here}::{first}")
            };
            if !modules.contains(&child) {
                return None;
            }
            here.split("::")
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        }
        None => return None,
    };
    let mut best = base.join("::");
    for seg in segs {
        base.push(seg.to_owned());
        let candidate = base.join("::");
        if modules.contains(&candidate) {
            best = candidate;
        } else {
            break;
        }
    }
    Some(best)
}

fn imports(code: &str, here: &str, modules: &BTreeSet<String>) -> BTreeSet<String> {
    let mut paths = Vec::new();
    // `use` trees (possibly multi-line, possibly `pub use`).
    let mut rest = code;
    while let Some(i) = rest.find("use ") {
        let before = rest[..i].chars().last();
        rest = &rest[i + 4..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        if let Some(end) = rest.find(';') {
            paths.extend(expand(&rest[..end]));
        }
    }
    // Inline `crate::a::b` and `super::a` paths.
    for key in ["crate::", "super::"] {
        for (i, _) in code.match_indices(key) {
            let tail: String = code[i..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            paths.push(tail.trim_end_matches(':').to_owned());
        }
    }
    paths
        .iter()
        .filter_map(|p| resolve(p, here, modules))
        .filter(|m| m != here)
        .collect()
}

#[test]
fn imports_point_down_and_never_loop() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut all = Vec::new();
    files(&src, &mut all);
    // The binary is its own crate.
    all.retain(|f| !f.ends_with("main.rs"));
    let modules: BTreeSet<String> = all.iter().map(|f| module_of(&src, f)).collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut wrong = Vec::new();
    for file in &all {
        let here = module_of(&src, file);
        let text = std::fs::read_to_string(file).expect("readable source");
        let deps = imports(&code(&text), &here, &modules);
        for dep in &deps {
            if dep.is_empty() && !here.is_empty() {
                wrong.push(format!(
                    "{here} imports from the crate root (name the module)"
                ));
            }
            if let (Some(a), Some(b)) = (layer(&here), layer(dep)) {
                if b > a {
                    wrong.push(format!("{here} (layer {a}) imports {dep} (layer {b})"));
                }
            }
        }
        graph.insert(here, deps);
    }
    for m in &modules {
        if !m.is_empty() && layer(m).is_none() {
            wrong.push(format!("{m} belongs to no layer: add it to LAYERS"));
        }
    }
    // Depth-first search for a cycle.
    fn visit(
        m: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
        cycles: &mut Vec<String>,
    ) {
        if let Some(pos) = stack.iter().position(|s| s == m) {
            let mut cycle = stack[pos..].to_vec();
            cycle.push(m.to_owned());
            cycles.push(cycle.join(" → "));
            return;
        }
        if !done.insert(m.to_owned()) {
            return;
        }
        stack.push(m.to_owned());
        for dep in graph.get(m).into_iter().flatten() {
            visit(dep, graph, stack, done, cycles);
        }
        stack.pop();
    }
    let mut cycles = Vec::new();
    let mut done = BTreeSet::new();
    for m in graph.keys() {
        visit(m, &graph, &mut Vec::new(), &mut done, &mut cycles);
    }
    wrong.extend(cycles.into_iter().map(|c| format!("import loop: {c}")));
    assert!(wrong.is_empty(), "\n{}\n", wrong.join("\n"));
    // The check itself must see imports: a few that exist today.
    assert!(graph["conn::deliver"].contains("conn"));
    assert!(graph["bus::redis::link"].contains("core::hub"));
}

#[test]
fn use_trees_expand() {
    assert_eq!(
        expand("super::{kept, wire::{self, MessageBody}, Cluster}"),
        [
            "super::kept",
            "super::wire",
            "super::wire::MessageBody",
            "super::Cluster"
        ]
    );
    assert_eq!(expand("crate::proto::Outbound"), ["crate::proto::Outbound"]);
}
