//! The source layout rules of docs/architecture.md, checked over every `src/**/*.rs`: imports
//! run one way between the layers, and no two files import each other (directly or around a
//! loop). The module graph comes from the `crate::…`, `super::…` and `self::…` paths in each
//! file (and `sftd::…` in main.rs), with comments and string literals removed and `pub use`
//! re-exports followed to the file that defines the item. Also: no file of code, there or in
//! the tests, tools, scripts and dashboard, grows past 600 lines.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level module → its layer; a module may import only from lower layers (and itself).
/// `main` is src/main.rs and src/lib.rs.
const LAYERS: &[(&str, i32)] = &[
    ("main", 4),
    ("cli", 3),
    ("bench", 3),
    ("estimate", 3),
    ("api", 2),
    ("worker", 1),
    ("hub", 0),
    ("train", 0),
    ("store", 0),
    ("storage", 0),
    ("config", -1),
    ("alloc", -1),
    ("fault", -1),
];

/// Imports allowed inside one layer: `hub` resolves models, which needs the engine's demo model
/// and spec constants. `train`, `store` and `storage` import neither each other nor `hub`.
const SIDEWAYS: &[(&str, &str)] = &[("hub", "train")];

const MAX_LINES: usize = 600;

/// One source file: its module path (`["store", "jobs"]`; `[]` for lib.rs and main.rs).
struct SourceFile {
    path: PathBuf,
    module: Vec<String>,
    code: String,
    /// `code` without its `#[cfg(test)]` modules.
    product_code: String,
}

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rel(path: &Path) -> String {
    path.strip_prefix(env!("CARGO_MANIFEST_DIR"))
        .unwrap_or(path)
        .display()
        .to_string()
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    collect_code(dir, &["rs"], out)
}

/// Files under `dir` with one of `extensions`, outside dependency and build directories.
fn collect_code(dir: &Path, extensions: &[&str], out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap_or_default();
        if path.is_dir() {
            if !["node_modules", "target", "__pycache__"]
                .iter()
                .any(|d| name == *d)
            {
                collect_code(&path, extensions, out);
            }
        } else if path
            .extension()
            .is_some_and(|e| extensions.iter().any(|x| e == *x))
        {
            out.push(path);
        }
    }
}

fn module_of(path: &Path) -> Vec<String> {
    let rel = path.strip_prefix(src_dir()).unwrap();
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts
}

/// The source with comments, string and char literals blanked (so `crate::` in a doc comment or
/// a message is not an import).
fn strip(src: &str) -> String {
    let b: Vec<char> = src.chars().collect();
    let mut out = String::with_capacity(src.len());
    let ident = |c: char| c.is_alphanumeric() || c == '_';
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let next = b.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < b.len() && b[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == '/' && b.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if b[i] == '*' && b.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            out.push(' ');
        } else if c == 'r' && (i == 0 || !ident(b[i - 1])) && matches!(next, Some('#' | '"')) {
            // r"…", r#"…"#
            let mut j = i + 1;
            while b.get(j) == Some(&'#') {
                j += 1;
            }
            if b.get(j) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            let hashes = j - i - 1;
            j += 1;
            while j < b.len()
                && !(b[j] == '"' && (0..hashes).all(|k| b.get(j + 1 + k) == Some(&'#')))
            {
                j += 1;
            }
            i = j + 1 + hashes;
            out.push_str("\"\"");
        } else if c == '"' {
            i += 1;
            while i < b.len() && b[i] != '"' {
                i += if b[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("\"\"");
        } else if c == '\'' && next == Some('\\') {
            i += 2;
            while i < b.len() && b[i] != '\'' {
                i += 1;
            }
            i += 1;
            out.push_str("' '");
        } else if c == '\'' && b.get(i + 2) == Some(&'\'') {
            i += 3;
            out.push_str("' '");
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

/// `code` (already stripped) without `#[cfg(test)] mod … { … }` blocks.
fn without_test_modules(code: &str) -> String {
    let mut out = String::with_capacity(code.len());
    let mut rest = code;
    while let Some(i) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..i]);
        let after = &rest[i + "#[cfg(test)]".len()..];
        let is_mod = after.trim_start().starts_with("mod ");
        let Some(open) = after.find(['{', ';']).filter(|_| is_mod) else {
            out.push_str("#[cfg(test)]");
            rest = after;
            continue;
        };
        let mut depth = 0;
        let mut end = after.len();
        for (j, c) in after[open..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                ';' if depth == 0 => {}
                _ => continue,
            }
            if depth == 0 {
                end = open + j + 1;
                break;
            }
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

/// Expands a `use` tree (`a::{b, c::{d, e}}`) into its paths.
fn expand_use(tree: &str) -> Vec<String> {
    let tree = tree.trim();
    let Some(open) = tree.find('{') else {
        // `a::b as c` names `a::b`.
        return tree
            .split_whitespace()
            .next()
            .map(|p| vec![p.to_string()])
            .unwrap_or_default();
    };
    let prefix: String = tree[..open].split_whitespace().collect();
    let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
    let mut items = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(&inner[start..]);
    items
        .into_iter()
        .filter(|s| !s.is_empty())
        .flat_map(|s| {
            let prefix = prefix.clone();
            expand_use(s)
                .into_iter()
                .map(move |p| format!("{prefix}{p}"))
        })
        .collect()
}

/// `use` trees (with `pub use` marked) and other paths starting with `crate`, `super`, `self`
/// or `root` (the library's name, for main.rs).
fn paths_in(code: &str, root: &str) -> (Vec<String>, Vec<String>) {
    let mut uses = Vec::new();
    let mut reexports = Vec::new();
    let mut rest = code;
    let ident = |c: char| c.is_alphanumeric() || c == '_';
    // `use` statements.
    while let Some(i) = rest.find("use ") {
        let boundary = rest[..i].chars().last().is_none_or(|c| !ident(c));
        let after = &rest[i + 4..];
        if !boundary {
            rest = after;
            continue;
        }
        let end = after.find(';').unwrap_or(after.len());
        let public = rest[..i].trim_end().ends_with("pub") || rest[..i].trim_end().ends_with(')');
        for p in expand_use(&after[..end]) {
            if public {
                reexports.push(p.clone());
            }
            uses.push(p);
        }
        rest = &after[end..];
    }
    // Paths anywhere else (`crate::train::run(…)`).
    let text = code;
    for start in ["crate::", "super::", "self::", &format!("{root}::") as &str] {
        let mut from = 0;
        while let Some(j) = text[from..].find(start) {
            let at = from + j;
            from = at + start.len();
            let before = text[..at].chars().last();
            if before.is_some_and(|c| ident(c) || c == ':' || c == '$') {
                continue;
            }
            let path: String = text[at..]
                .chars()
                .take_while(|&c| ident(c) || c == ':')
                .collect();
            // `use a::{…}`'s prefix alone names no item; its expansion above does.
            if !path.ends_with("::") {
                uses.push(path);
            }
        }
    }
    (uses, reexports)
}

struct Graph {
    files: Vec<SourceFile>,
    /// module path → index into `files`
    by_module: BTreeMap<Vec<String>, usize>,
    /// file → (item name → absolute path it re-exports)
    reexports: Vec<BTreeMap<String, Vec<String>>>,
}

impl Graph {
    fn load() -> Self {
        let mut paths = Vec::new();
        collect(&src_dir(), &mut paths);
        paths.sort();
        let files: Vec<SourceFile> = paths
            .into_iter()
            .map(|path| {
                let text = std::fs::read_to_string(&path).unwrap();
                let code = strip(&text);
                SourceFile {
                    module: module_of(&path),
                    product_code: without_test_modules(&code),
                    code,
                    path,
                }
            })
            .collect();
        let by_module = files
            .iter()
            .enumerate()
            .filter(|(_, f)| !f.path.ends_with("main.rs"))
            .map(|(i, f)| (f.module.clone(), i))
            .collect();
        let mut g = Graph {
            files,
            by_module,
            reexports: Vec::new(),
        };
        g.reexports = (0..g.files.len())
            .map(|i| {
                let (_, re) = paths_in(&g.files[i].code, "sftd");
                re.iter()
                    .filter_map(|p| {
                        let abs = g.absolute(i, p)?;
                        Some((abs.last()?.clone(), abs))
                    })
                    .collect()
            })
            .collect();
        g
    }

    /// `p` as an absolute module path, or None when it does not start inside the crate.
    fn absolute(&self, file: usize, p: &str) -> Option<Vec<String>> {
        let f = &self.files[file];
        let lib = if f.path.ends_with("main.rs") {
            "sftd"
        } else {
            "crate"
        };
        let mut segs: Vec<&str> = p.split("::").filter(|s| !s.is_empty()).collect();
        let mut base: Vec<String> = match segs.first()? {
            s if *s == lib => {
                segs.remove(0);
                Vec::new()
            }
            &"super" | &"self" => f.module.clone(),
            _ => {
                // A child module named without `self::` (`use jobs::JobRow;` in mod.rs).
                let mut child = f.module.clone();
                child.push(segs[0].to_string());
                if self.by_module.contains_key(&child) && !f.path.ends_with("main.rs") {
                    f.module.clone()
                } else {
                    return None;
                }
            }
        };
        while let Some(&s) = segs.first() {
            match s {
                "super" => {
                    base.pop()?;
                }
                "self" => {}
                _ => break,
            }
            segs.remove(0);
        }
        base.extend(segs.iter().map(|s| s.to_string()));
        Some(base)
    }

    /// The file defining what `abs` names: the longest module prefix that is a file, following
    /// that file's `pub use` of the next segment.
    fn resolve(&self, abs: &[String], depth: usize) -> Option<usize> {
        let mut n = abs.len();
        while n > 0 && !self.by_module.contains_key(&abs[..n]) {
            n -= 1;
        }
        if n == 0 {
            return None; // the crate root itself
        }
        let file = *self.by_module.get(&abs[..n])?;
        if depth < 8 {
            if let Some(target) = abs.get(n).and_then(|item| self.reexports[file].get(item)) {
                if target.as_slice() != abs {
                    return self.resolve(target, depth + 1).or(Some(file));
                }
            }
        }
        Some(file)
    }

    /// file → files it imports (self-edges dropped); `with_tests`: also from its test modules.
    fn edges(&self, with_tests: bool) -> Vec<BTreeSet<usize>> {
        (0..self.files.len())
            .map(|i| {
                let f = &self.files[i];
                let code = if with_tests { &f.code } else { &f.product_code };
                let (uses, _) = paths_in(code, "sftd");
                uses.iter()
                    .filter_map(|p| self.resolve(&self.absolute(i, p)?, 0))
                    .filter(|&j| j != i)
                    .collect()
            })
            .collect()
    }

    fn top(&self, file: usize) -> &str {
        self.files[file]
            .module
            .first()
            .map(String::as_str)
            .unwrap_or("main")
    }
}

fn layer(top: &str) -> Option<i32> {
    LAYERS.iter().find(|(m, _)| *m == top).map(|&(_, l)| l)
}

#[test]
fn imports_run_down_the_layers() {
    let g = Graph::load();
    let edges = g.edges(true);
    let mut problems = Vec::new();
    for (i, targets) in edges.iter().enumerate() {
        let from = g.top(i);
        let Some(from_layer) = layer(from) else {
            problems.push(format!(
                "{}: top-level module `{from}` has no layer: add it to LAYERS in tests/layout.rs \
                 and to docs/architecture.md",
                rel(&g.files[i].path)
            ));
            continue;
        };
        for &j in targets {
            let to = g.top(j);
            let ok = from == to
                || layer(to).is_some_and(|l| l < from_layer)
                || SIDEWAYS.contains(&(from, to));
            if !ok {
                problems.push(format!(
                    "{} imports {}: `{from}` may not import `{to}` (layers, top down: main → \
                     cli/bench → api → worker → hub/train/store → config; sideways only {:?})",
                    rel(&g.files[i].path),
                    rel(&g.files[j].path),
                    SIDEWAYS
                ));
            }
        }
    }
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
}

#[test]
fn no_import_cycles_between_files() {
    let g = Graph::load();
    // Test modules are left out: a test may check one sibling against another (an oracle).
    let mut edges = g.edges(false);
    // A module naming its own submodules (declaring, re-exporting or calling them) is how the
    // tree is built; a cycle must pass between files that are not each other's ancestors.
    for (i, targets) in edges.iter_mut().enumerate() {
        let parent = &g.files[i].module;
        targets.retain(|&j| {
            let child = &g.files[j].module;
            !(child.len() > parent.len() && child.starts_with(parent))
        });
    }
    // Depth-first search; a back edge closes a cycle.
    fn visit(
        v: usize,
        edges: &[BTreeSet<usize>],
        state: &mut [u8],
        stack: &mut Vec<usize>,
        cycles: &mut Vec<Vec<usize>>,
    ) {
        state[v] = 1;
        stack.push(v);
        for &w in &edges[v] {
            match state[w] {
                0 => visit(w, edges, state, stack, cycles),
                1 => {
                    let at = stack.iter().position(|&x| x == w).unwrap();
                    let mut cycle = stack[at..].to_vec();
                    cycle.push(w);
                    cycles.push(cycle);
                }
                _ => {}
            }
        }
        stack.pop();
        state[v] = 2;
    }
    let mut state = vec![0u8; g.files.len()];
    let mut cycles = Vec::new();
    for v in 0..g.files.len() {
        if state[v] == 0 {
            visit(v, &edges, &mut state, &mut Vec::new(), &mut cycles);
        }
    }
    let described: Vec<String> = cycles
        .iter()
        .map(|c| {
            let names: Vec<String> = c.iter().map(|&f| rel(&g.files[f].path)).collect();
            format!("import cycle: {}", names.join(" → "))
        })
        .collect();
    assert!(described.is_empty(), "\n{}", described.join("\n"));
}

/// Every file of code in the tree: the crate, its tests, tools, scripts and the dashboard.
#[test]
fn no_file_of_code_over_600_lines() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut paths = Vec::new();
    for dir in ["src", "tests", "tools", "scripts", "static", "examples"] {
        let extensions = ["rs", "py", "sh", "js", "mjs", "html", "css"];
        collect_code(&root.join(dir), &extensions, &mut paths);
    }
    assert!(paths.len() > 100, "found only {} files", paths.len());
    let long: Vec<String> = paths
        .iter()
        .map(|path| (path, std::fs::read_to_string(path).unwrap().lines().count()))
        .filter(|&(_, lines)| lines > MAX_LINES)
        .map(|(path, lines)| {
            format!(
                "{} has {lines} lines (at most {MAX_LINES}): split it",
                rel(path)
            )
        })
        .collect();
    assert!(long.is_empty(), "\n{}", long.join("\n"));
}

/// The checker itself: it sees through comments, strings, `use` groups and re-exports.
#[test]
fn the_checker_reads_paths_the_way_rustc_does() {
    let code = strip(
        "// use crate::api;\n/* crate::worker */ let s = \"crate::hub\"; let c = '{';\n\
         use crate::{store::{jobs::JobRow, Store}, train as t};\nuse super::x::y;\nfn f<'a>() { crate::config::load() }",
    );
    assert!(!code.contains("api") && !code.contains("worker") && !code.contains("hub"));
    let (uses, re) = paths_in(&code, "sftd");
    for p in [
        "crate::store::jobs::JobRow",
        "crate::store::Store",
        "crate::train",
        "super::x::y",
        "crate::config::load",
    ] {
        assert!(uses.iter().any(|u| u == p), "{p} not found in {uses:?}");
    }
    assert!(re.is_empty());
    let product = without_test_modules("use crate::a;\n#[cfg(test)]\nmod tests { use crate::b; fn f() { if x { } } }\nuse crate::c;");
    assert!(
        product.contains("crate::a")
            && product.contains("crate::c")
            && !product.contains("crate::b")
    );
    let (_, re) = paths_in("pub use jobs::{JobRow, JobStatus};", "sftd");
    assert_eq!(re, ["jobs::JobRow", "jobs::JobStatus"]);

    let g = Graph::load();
    let file = |p: &str| g.files.iter().position(|f| f.path.ends_with(p)).unwrap();
    let events = file("store/events.rs");
    // `super::JobStatus` from store/events.rs is defined where store/mod.rs re-exports it from.
    let abs = g.absolute(events, "super::JobStatus").unwrap();
    assert_eq!(abs, ["store", "JobStatus"]);
    let defined = g.resolve(&abs, 0).unwrap();
    assert!(
        g.files[defined].code.contains("enum JobStatus"),
        "resolved to {}",
        rel(&g.files[defined].path)
    );
}
