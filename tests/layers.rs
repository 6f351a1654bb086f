//! The layering of `src/` as a checked fact: no import cycle between the broker's top-level
//! modules (`storage`, `rt` < `mesh` < `broker` < `net` < `shard` < `server`, ARCHITECTURE.md),
//! and none between its files, a folder's own parent/child pairs aside (a `mod.rs` and the
//! files of its folder are one module split for reading).
//!
//! It reads the source as text: every `crate::a::b` path and every `super::` path outside
//! comments and outside unit-test files (`tests.rs`, `proptests.rs`, trailing `mod tests`)
//! is an edge to the longest module that path names.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

type Module = Vec<String>;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).expect("read src/") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `src/broker/host/mod.rs` is `broker::host`; `src/lib.rs` and `src/main.rs` are the root.
fn module_of(src: &Path, file: &Path) -> Module {
    let rel = file
        .strip_prefix(src)
        .expect("under src/")
        .with_extension("");
    let mut parts: Module = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts
}

/// The source without comments and without a trailing unit-test module.
fn code_of(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests {") {
        Some(i) => &text[..i],
        None => text,
    };
    text.lines()
        .map(|line| match line.find("//") {
            Some(i) => &line[..i],
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The `a::b::c` after every occurrence of `prefix`.
fn paths_after<'a>(code: &'a str, prefix: &str) -> Vec<Vec<&'a str>> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find(prefix) {
        let before = rest[..i].chars().next_back();
        rest = &rest[i + prefix.len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let end = rest
            .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(rest.len());
        out.push(rest[..end].split("::").filter(|s| !s.is_empty()).collect());
    }
    out
}

/// The longest known module that `path` names.
fn resolve(modules: &BTreeSet<Module>, path: &[&str]) -> Option<Module> {
    (1..=path.len()).rev().find_map(|n| {
        let m: Module = path[..n].iter().map(|s| s.to_string()).collect();
        modules.contains(&m).then_some(m)
    })
}

fn related(a: &Module, b: &Module) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

/// A cycle in `edges`, as the modules along it, if there is one.
fn find_cycle<N: Ord + Clone>(edges: &BTreeMap<N, BTreeSet<N>>) -> Option<Vec<N>> {
    fn visit<N: Ord + Clone>(
        n: &N,
        edges: &BTreeMap<N, BTreeSet<N>>,
        state: &mut BTreeMap<N, bool>,
        stack: &mut Vec<N>,
    ) -> Option<Vec<N>> {
        match state.get(n) {
            Some(true) => return None,
            Some(false) => {
                let from = stack.iter().position(|m| m == n).expect("on the stack");
                return Some(stack[from..].to_vec());
            }
            None => {}
        }
        state.insert(n.clone(), false);
        stack.push(n.clone());
        for m in edges.get(n).into_iter().flatten() {
            if let Some(cycle) = visit(m, edges, state, stack) {
                return Some(cycle);
            }
        }
        stack.pop();
        state.insert(n.clone(), true);
        None
    }
    let mut state = BTreeMap::new();
    edges
        .keys()
        .find_map(|n| visit(n, edges, &mut state, &mut Vec::new()))
}

struct Graph {
    files: BTreeMap<Module, BTreeSet<Module>>,
    top: BTreeMap<String, BTreeSet<String>>,
}

fn graph() -> Graph {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let sources: Vec<(Module, String)> = files
        .iter()
        .filter(|f| {
            !matches!(
                f.file_name().and_then(|n| n.to_str()),
                Some("tests.rs" | "proptests.rs")
            )
        })
        .map(|f| {
            (
                module_of(&src, f),
                fs::read_to_string(f).expect("read a source file"),
            )
        })
        .collect();
    let modules: BTreeSet<Module> = sources.iter().map(|(m, _)| m.clone()).collect();
    let mut g = Graph {
        files: BTreeMap::new(),
        top: BTreeMap::new(),
    };
    for (module, text) in &sources {
        let code = code_of(text);
        let parent: Vec<&str> = module[..module.len().saturating_sub(1)]
            .iter()
            .map(String::as_str)
            .collect();
        let mut targets: Vec<Module> = paths_after(&code, "crate::")
            .iter()
            .filter_map(|p| resolve(&modules, p))
            .collect();
        for p in paths_after(&code, "super::") {
            let full: Vec<&str> = parent.iter().copied().chain(p).collect();
            targets.extend(resolve(&modules, &full));
        }
        for t in targets {
            if !related(module, &t) {
                g.files.entry(module.clone()).or_default().insert(t.clone());
            }
            if let (Some(a), Some(b)) = (module.first(), t.first()) {
                if a != b {
                    g.top.entry(a.clone()).or_default().insert(b.clone());
                }
            }
        }
    }
    g
}

#[test]
fn no_import_cycle_between_the_top_level_modules() {
    let g = graph();
    assert!(
        g.top.get("broker").is_some_and(|b| b.contains("mesh")),
        "the reader sees the broker's imports: {:?}",
        g.top
    );
    if let Some(cycle) = find_cycle(&g.top) {
        panic!(
            "top-level modules import each other in a cycle: {cycle:?}; layers: {:?}",
            g.top
        );
    }
}

#[test]
fn no_import_cycle_between_files_outside_a_folders_own_parent_and_children() {
    let g = graph();
    assert!(
        g.files.len() > 30,
        "the reader found the source files: {}",
        g.files.len()
    );
    if let Some(cycle) = find_cycle(&g.files) {
        let names: Vec<String> = cycle.iter().map(|m| m.join("::")).collect();
        panic!("files import each other in a cycle: {}", names.join(" -> "));
    }
}

#[test]
fn the_cycle_finder_finds_a_cycle() {
    let mut edges: BTreeMap<u8, BTreeSet<u8>> = BTreeMap::new();
    edges.entry(1).or_default().insert(2);
    edges.entry(2).or_default().insert(3);
    assert_eq!(find_cycle(&edges), None);
    edges.entry(3).or_default().insert(1);
    assert_eq!(find_cycle(&edges), Some(vec![1, 2, 3]));
}
