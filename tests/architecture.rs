//! The layout is the architecture: the crate's modules, and the files inside
//! each module, depend on each other without cycles, and no module reaches
//! into another's internals.
//!
//! Dependencies are read from the source: `crate::m` paths between
//! top-level modules, and `super::` paths between the files of one module
//! (an item `mod.rs` re-exports counts as the file that defines it). Comment
//! lines and unit-test modules don't count.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;

type Graph = BTreeMap<String, BTreeSet<String>>;

#[test]
fn the_top_level_modules_form_no_cycle() {
    let roots = root_reexports();
    let mut graph = Graph::new();
    for (module, files) in modules() {
        for (_, code) in files {
            for target in paths_after(&code, "crate::") {
                let target = roots.get(&target).cloned().unwrap_or(target);
                if target != module && modules_named().contains(&target) {
                    graph.entry(module.clone()).or_default().insert(target);
                }
            }
        }
    }
    assert_acyclic("src/", &graph);
}

#[test]
fn the_files_of_each_module_form_no_cycle() {
    for (module, files) in modules() {
        let Some(parent) = files.get("mod") else {
            continue;
        };
        let siblings: BTreeSet<String> = files.keys().filter(|f| *f != "mod").cloned().collect();
        let reexported = reexports(parent, &siblings);
        let mut graph = Graph::new();
        for (file, code) in &files {
            if file == "mod" {
                continue;
            }
            for name in paths_after(code, "super::") {
                let target = if siblings.contains(&name) {
                    Some(name)
                } else {
                    reexported.get(&name).cloned()
                };
                if let Some(target) = target.filter(|target| target != file) {
                    graph.entry(file.clone()).or_default().insert(target);
                }
            }
        }
        assert_acyclic(&format!("src/{module}/"), &graph);
    }
}

#[test]
fn no_module_opens_its_internals_to_the_rest_of_the_crate() {
    // What `serving`, `health` or a user needs from the batcher, the pool
    // or health is public API; everything else stays inside its module.
    for module in ["batch", "pool", "health"] {
        for (file, code) in &modules()[module] {
            if let Some(line) = code.lines().find(|line| line.contains("pub(crate)")) {
                panic!("src/{module}/{file}.rs opens an item to the crate: {line}");
            }
        }
    }
}

/// Every module directory's files, by file stem, with comment lines and
/// unit-test modules removed; single-file modules under the name `mod`.
fn modules() -> BTreeMap<String, BTreeMap<String, String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut modules = BTreeMap::new();
    for entry in fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let stem = path.file_stem().unwrap().to_str().unwrap().to_owned();
        let mut files = BTreeMap::new();
        if path.is_dir() {
            for file in fs::read_dir(&path).unwrap() {
                let file = file.unwrap().path();
                let name = file.file_stem().unwrap().to_str().unwrap().to_owned();
                files.insert(name, code(&file));
            }
        } else if stem != "lib" {
            files.insert("mod".to_owned(), code(&path));
        } else {
            continue;
        }
        modules.insert(stem, files);
    }
    modules
}

fn modules_named() -> BTreeSet<String> {
    modules().into_keys().collect()
}

fn code(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap();
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(at) => &text[..at],
        None => &text[..],
    };
    text.lines()
        .filter(|line| !line.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The first path segment after each `prefix`, including each member of a
/// `prefix{a, b::c}` group.
fn paths_after(code: &str, prefix: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find(prefix) {
        rest = &rest[at + prefix.len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = closing_brace(group);
            names.extend(group[..end].split(',').filter_map(first_segment));
        } else if let Some(name) = first_segment(rest) {
            names.push(name);
        }
    }
    names
}

fn closing_brace(group: &str) -> usize {
    let mut depth = 0;
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => return i,
            '}' => depth -= 1,
            _ => {}
        }
    }
    group.len()
}

fn first_segment(path: &str) -> Option<String> {
    let name: String = path
        .trim_start()
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect();
    (!name.is_empty() && name != "self").then_some(name)
}

/// The items `mod.rs` takes from its files (`use file::Item`,
/// `pub use file::{A, B}`), by item name.
fn reexports(parent: &str, siblings: &BTreeSet<String>) -> BTreeMap<String, String> {
    let mut items = BTreeMap::new();
    for statement in parent.split(';') {
        let statement = statement.trim();
        let Some(path) = statement
            .strip_prefix("pub use ")
            .or_else(|| statement.strip_prefix("use "))
        else {
            continue;
        };
        let Some(file) = first_segment(path).filter(|file| siblings.contains(file)) else {
            continue;
        };
        let names = path[file.len()..].trim_start_matches("::");
        let names = names.trim_start_matches('{').trim_end_matches('}');
        for name in names.split(',') {
            let last = name.trim().rsplit("::").next().unwrap_or_default();
            if let Some(last) = first_segment(last) {
                items.insert(last, file.clone());
            }
        }
    }
    items
}

/// The crate root's re-exports (`pub use model::{Loader, ...}`): a
/// `crate::Loader` path depends on `model`.
fn root_reexports() -> BTreeMap<String, String> {
    let lib = code(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs"));
    reexports(&lib, &modules_named())
}

fn assert_acyclic(place: &str, graph: &Graph) {
    fn visit(
        node: &str,
        graph: &Graph,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(start) = path.iter().position(|n| n == node) {
            let mut cycle = path[start..].to_vec();
            cycle.push(node.to_owned());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }

    let mut done = BTreeSet::new();
    for node in graph.keys() {
        if let Some(cycle) = visit(node, graph, &mut Vec::new(), &mut done) {
            panic!("an import cycle in {place}: {}", cycle.join(" -> "));
        }
    }
}
