//! The crate's module structure, read from its sources: no module cycles, the leaf modules
//! depend on leaf modules only, and the CPU engine on leaf modules only (never on the candle
//! models, the ops, the runners or the model kinds).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Modules that may be used by everything and use only each other.
const LEAVES: [&str; 10] =
    ["arch", "checkpoint", "config", "error", "float", "launch", "optimizer", "params", "presets", "rng"];

/// Top-level module -> the top-level modules its files name as `crate::module`.
fn dependencies() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut files = vec![src.clone()];
    while let Some(path) = files.pop() {
        if path.is_dir() {
            files.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
            continue;
        }
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let relative = path.strip_prefix(&src).unwrap();
        let module =
            relative.components().next().unwrap().as_os_str().to_string_lossy().trim_end_matches(".rs").to_string();
        if module == "lib" {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let deps = graph.entry(module.clone()).or_default();
        for (i, _) in text.match_indices("crate::") {
            let rest = &text[i + "crate::".len()..];
            let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            if !name.is_empty() && name != module {
                deps.insert(name);
            }
        }
    }
    graph
}

#[test]
fn the_module_graph_has_no_cycles() {
    let graph = dependencies();
    // Depth-first search for a back edge.
    fn visit(
        m: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        path: &mut Vec<String>,
    ) {
        match state.get(m) {
            Some(2) => return,
            Some(1) => panic!("module cycle: {} -> {m}", path.join(" -> ")),
            _ => {}
        }
        state.insert(m.to_string(), 1);
        path.push(m.to_string());
        for d in graph.get(m).into_iter().flatten() {
            visit(d, graph, state, path);
        }
        path.pop();
        state.insert(m.to_string(), 2);
    }
    let mut state = BTreeMap::new();
    for m in graph.keys() {
        visit(m, &graph, &mut state, &mut Vec::new());
    }
    assert!(graph.len() > 20, "the crate's modules were not found: {:?}", graph.keys());
}

#[test]
fn leaves_and_the_engine_depend_on_leaves_only() {
    let graph = dependencies();
    for m in LEAVES.iter().chain(&["engine"]) {
        let deps = &graph[*m];
        let outside: Vec<_> = deps.iter().filter(|d| !LEAVES.contains(&d.as_str())).collect();
        assert!(outside.is_empty(), "{m} depends on {outside:?}, which are not leaf modules");
    }
    // The check itself sees dependencies: the engine does use leaves.
    assert!(graph["engine"].contains("params") && graph["engine"].contains("arch"));
}
