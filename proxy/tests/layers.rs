//! The proxy crate's modules form layers (see the crate docs): a module may use the model and
//! the layers below its own, never one above. This reads the sources the way a reviewer would
//! grep them, so a new upward import fails here with the file and line.
use std::{fs, path::Path};

/// Rank of each top-level module; a module may use modules of a lower rank (and its own).
/// Rank 0 is the model, whose modules may use each other; modules of one rank above 0 may not.
const RANKS: &[(&str, u8)] = &[
    ("workload", 0),
    ("service", 0),
    ("authz", 0),
    ("route", 0),
    ("cluster", 0),
    ("l7", 0),
    ("listener", 0),
    ("identity", 0),
    ("metrics", 0),
    ("connections", 0),
    ("netns", 0),
    ("proto", 0),
    ("envoy_json", 0),
    ("timefmt", 0),
    ("state", 10),
    ("transport", 20),
    ("hbone", 30),
    ("upstream", 40),
    ("http", 50),
    ("inbound", 60),
    ("outbound", 60),
    ("config", 35),
    ("pod", 70),
    ("xds", 70),
    ("resolver", 15),
    ("admin", 80),
];

fn rank(module: &str) -> Option<u8> {
    RANKS.iter().find(|(m, _)| *m == module).map(|(_, r)| *r)
}

/// The top-level modules a line names through `crate::`, including `crate::{a::x, b}` groups.
fn crate_refs(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = line;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 1;
            let mut item = String::new();
            let mut at_item_start = true;
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    _ => {}
                }
                if depth == 0 {
                    break;
                }
                if depth == 1 && at_item_start && (c.is_alphanumeric() || c == '_') {
                    item.push(c);
                    continue;
                }
                if !item.is_empty() {
                    out.push(std::mem::take(&mut item));
                    at_item_start = false;
                }
                if depth == 1 && c == ',' {
                    at_item_start = true;
                }
            }
            if !item.is_empty() {
                out.push(item);
            }
        } else {
            let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            out.push(name);
        }
    }
    out
}

/// Joins a `use crate::{ ... };` spread over several lines into one.
fn statements(src: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut pending: Option<(usize, String)> = None;
    for (i, line) in src.lines().enumerate() {
        let code = line.split("//").next().unwrap_or("");
        if let Some((start, mut text)) = pending.take() {
            text.push_str(code);
            if code.contains(';') {
                out.push((start, text));
            } else {
                pending = Some((start, text));
            }
            continue;
        }
        if code.trim_start().starts_with("use crate::{") && !code.contains(';') {
            pending = Some((i + 1, code.to_string()));
        } else {
            out.push((i + 1, code.to_string()));
        }
    }
    out
}

fn check_dir(dir: &Path, src_root: &Path, violations: &mut Vec<String>) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            check_dir(&path, src_root, violations);
            continue;
        }
        if path.extension().and_then(|e| e.to_str()) != Some("rs") {
            continue;
        }
        let rel = path.strip_prefix(src_root).unwrap_or(&path);
        let first = rel
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .unwrap_or("");
        let module = first.trim_end_matches(".rs");
        let Some(own) = rank(module) else {
            if module != "lib" {
                violations.push(format!("{}: module `{module}` has no layer in RANKS", rel.display()));
            }
            continue;
        };
        let src = fs::read_to_string(&path).unwrap_or_default();
        for (line_no, stmt) in statements(&src) {
            for used in crate_refs(&stmt) {
                let Some(theirs) = rank(&used) else { continue };
                let upward = theirs > own || (theirs == own && own > 0 && used != module);
                if upward {
                    violations.push(format!(
                        "{}:{line_no}: `{module}` (layer {own}) uses `{used}` (layer {theirs})",
                        rel.display()
                    ));
                }
            }
        }
    }
}

#[test]
fn no_module_imports_one_above_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut violations = Vec::new();
    check_dir(&src, &src, &mut violations);
    assert!(violations.is_empty(), "layering violations:\n{}", violations.join("\n"));
}

#[test]
fn the_checker_sees_grouped_and_plain_paths() {
    assert_eq!(crate_refs("use crate::{a::B, c, d::{e, f}};"), ["a", "c", "d"]);
    assert_eq!(crate_refs("let x = crate::pod::y(crate::http::z);"), ["pod", "http"]);
}
