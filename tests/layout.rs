//! The code's layout, checked: what a reader relies on when they open a
//! crate and follow one record through it.
//!
//! - No import cycles between modules (files) in any crate: a path to
//!   another module (`crate::a::b`, `super::x`, `self::child`, or a
//!   declared child's `child::item`) is an edge, and the graph of each crate
//!   must have no cycle. So a stage's config and metrics files are leaves
//!   that the whole-file config and the registry assemble, never the other
//!   way round.
//! - No module over [`MAX_LINES`] lines of code (before its unit tests)
//!   unless its module doc says why it is one file.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Lines of code a module may have before its doc must say why it is one
/// file (the issue asked for "about 500").
const MAX_LINES: usize = 520;

/// What a long module's doc says to justify its length (compared without
/// case): a phrase no doc says by accident.
const ONE_FILE: &str = "one concept in one file";

/// Where a file's unit tests start.
const TESTS: &str = "#[cfg(test)]\nmod ";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("source folder") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of a file before its unit tests, without comments.
fn code(text: &str) -> String {
    let text = text.split(TESTS).next().unwrap_or_default();
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) if !l[..i].contains('"') => &l[..i],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// One crate's source folder, and its module tree.
struct Crate {
    src: PathBuf,
    root_file: &'static str,
}

impl Crate {
    /// The file of module `path` (from the crate root), if there is one.
    fn file(&self, path: &[String]) -> Option<PathBuf> {
        if path.is_empty() {
            return Some(self.src.join(self.root_file));
        }
        let base = path.iter().fold(self.src.clone(), |p, s| p.join(s));
        let flat = base.with_extension("rs");
        let nested = base.join("mod.rs");
        [flat, nested].into_iter().find(|p| p.is_file())
    }

    /// The module path of `file`.
    fn module_of(&self, file: &Path) -> Vec<String> {
        let rel = file.strip_prefix(&self.src).expect("in src");
        let mut parts: Vec<String> = rel
            .with_extension("")
            .iter()
            .map(|s| s.to_string_lossy().into_owned())
            .collect();
        if parts.last().is_some_and(|l| l == "mod")
            || parts == [self.root_file.trim_end_matches(".rs")]
        {
            parts.pop();
        }
        parts
    }

    /// The deepest module file that `start` then `segments` name.
    fn resolve(&self, start: Vec<String>, segments: &[&str]) -> Option<PathBuf> {
        let mut path = start;
        let mut found = self.file(&path);
        for s in segments {
            path.push((*s).to_string());
            match self.file(&path) {
                Some(f) => found = Some(f),
                None => break,
            }
        }
        found
    }

    /// Every module file each file refers to.
    fn edges(&self) -> BTreeMap<PathBuf, BTreeSet<PathBuf>> {
        let mut files = Vec::new();
        rust_files(&self.src, &mut files);
        let mut edges = BTreeMap::new();
        for f in files {
            let code = code(&std::fs::read_to_string(&f).expect("source"));
            let me = self.module_of(&f);
            let mut to = BTreeSet::new();
            for (base, rest) in paths(&code) {
                let start = match base {
                    "crate" => Vec::new(),
                    "self" => me.clone(),
                    "super" => {
                        let mut m = me.clone();
                        m.pop();
                        m
                    }
                    child => {
                        let mut m = me.clone();
                        m.push(child.to_string());
                        m
                    }
                };
                let mut start = start;
                let mut rest = rest.as_slice();
                while let Some((&"super", tail)) = rest.split_first() {
                    start.pop();
                    rest = tail;
                }
                if let Some(t) = self.resolve(start, rest)
                    && t != f
                {
                    to.insert(t);
                }
            }
            edges.insert(f, to);
        }
        edges
    }
}

/// Paths in `code` that lead to modules: `crate::…`, `super::…`,
/// `self::…`, and `child::…` for each declared `mod child;`, with the
/// members of `{…}` groups expanded.
fn paths(code: &str) -> Vec<(&str, Vec<&str>)> {
    let children: Vec<&str> = code
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let l = match l.strip_prefix("pub") {
                Some(rest) if rest.starts_with('(') => rest.split_once(") ")?.1,
                Some(rest) => rest.trim_start(),
                None => l,
            };
            l.strip_prefix("mod ")?.strip_suffix(';')
        })
        .collect();
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut out = Vec::new();
    let bytes = code.as_bytes();
    let mut i = 0;
    while i < code.len() {
        let starts_word = i == 0 || !ident(bytes[i - 1] as char) && bytes[i - 1] != b':';
        let word_end = code[i..]
            .find(|c: char| !ident(c))
            .map_or(code.len(), |e| i + e);
        if !starts_word || word_end == i {
            i += code[i..].chars().next().map_or(1, char::len_utf8);
            continue;
        }
        let word = &code[i..word_end];
        let is_base = matches!(word, "crate" | "super" | "self") || children.contains(&word);
        if !is_base || !code[word_end..].starts_with("::") {
            i = word_end;
            continue;
        }
        let (found, end) = path_tail(code, word_end, Vec::new());
        out.extend(found.into_iter().map(|segs| (word, segs)));
        i = end.max(word_end);
    }
    out
}

/// Reads `::seg::seg` from `at`, with `::{a::b, c::{d, e}}` groups
/// expanded (nested too); returns every path, the bare prefix last, and
/// where it ended.
fn path_tail<'a>(code: &'a str, at: usize, prefix: Vec<&'a str>) -> (Vec<Vec<&'a str>>, usize) {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut out = Vec::new();
    let mut segs = prefix;
    let mut j = at;
    while code[j..].starts_with("::") {
        let s = j + 2;
        if code[s..].starts_with('{') {
            // The matching brace, and the members between top-level commas.
            let (mut depth, mut start, mut k) = (0usize, s + 1, s);
            while k < code.len() {
                match code.as_bytes()[k] {
                    b'{' => depth += 1,
                    b'}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    b',' if depth == 1 => {
                        out.extend(member(code, start, k, &segs));
                        start = k + 1;
                    }
                    _ => {}
                }
                k += 1;
            }
            out.extend(member(code, start, k.min(code.len()), &segs));
            j = (k + 1).min(code.len());
            break;
        }
        let e = code[s..]
            .find(|c: char| !ident(c))
            .map_or(code.len(), |e| s + e);
        if e == s {
            break;
        }
        segs.push(&code[s..e]);
        j = e;
    }
    out.push(segs);
    (out, j)
}

/// The paths of one member of a `{...}` group: `a::b`, `self`, `c::{d}`.
fn member<'a>(code: &'a str, start: usize, end: usize, prefix: &[&'a str]) -> Vec<Vec<&'a str>> {
    let text = &code[start..end];
    let lead = text.len() - text.trim_start().len();
    let first_end = text[lead..]
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .map_or(text.len(), |e| lead + e);
    let first = &text[lead..first_end];
    if first.is_empty() || first == "self" {
        return vec![prefix.to_vec()];
    }
    let mut segs = prefix.to_vec();
    segs.push(first);
    path_tail(code, start + first_end, segs).0
}

/// A cycle in `edges`, if there is one (as the files around it).
fn find_cycle(edges: &BTreeMap<PathBuf, BTreeSet<PathBuf>>) -> Option<Vec<PathBuf>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    fn visit(
        f: &PathBuf,
        edges: &BTreeMap<PathBuf, BTreeSet<PathBuf>>,
        marks: &mut BTreeMap<PathBuf, Mark>,
        stack: &mut Vec<PathBuf>,
    ) -> Option<Vec<PathBuf>> {
        match marks.get(f) {
            Some(Mark::Done) => return None,
            Some(Mark::Open) => {
                let at = stack.iter().position(|s| s == f).unwrap_or(0);
                return Some(stack[at..].to_vec());
            }
            None => {}
        }
        marks.insert(f.clone(), Mark::Open);
        stack.push(f.clone());
        for t in edges.get(f).into_iter().flatten() {
            if let Some(c) = visit(t, edges, marks, stack) {
                return Some(c);
            }
        }
        stack.pop();
        marks.insert(f.clone(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for f in edges.keys() {
        let mut stack = Vec::new();
        if let Some(c) = visit(f, edges, &mut marks, &mut stack) {
            return Some(c);
        }
    }
    None
}

fn crates() -> Vec<Crate> {
    let c = |name: &str, root_file| Crate {
        src: root().join("crates").join(name).join("src"),
        root_file,
    };
    vec![
        c("clipstream-model", "lib.rs"),
        c("clipstream-pipeline", "lib.rs"),
        c("clipstream", "main.rs"),
    ]
}

#[test]
fn no_module_imports_itself_back() {
    for k in crates() {
        let edges = k.edges();
        // The check sees the real edges: the engine reaches the stages.
        let engine = k.src.join("engine/mod.rs");
        if engine.is_file() {
            assert!(
                edges[&engine].contains(&k.src.join("sink/kafka/stage.rs")),
                "the edge finder missed engine -> sink::kafka::stage: {:?}",
                edges[&engine]
            );
        }
        if let Some(cycle) = find_cycle(&edges) {
            let names: Vec<String> = cycle
                .iter()
                .map(|p| p.strip_prefix(&k.src).unwrap_or(p).display().to_string())
                .collect();
            panic!(
                "{}: modules import each other in a cycle: {}",
                k.src.display(),
                names.join(" -> ")
            );
        }
    }
}

/// The cycle finder finds a cycle when there is one.
#[test]
fn the_cycle_finder_finds_cycles() {
    let p = |s: &str| PathBuf::from(s);
    let mut edges = BTreeMap::new();
    edges.insert(p("a"), BTreeSet::from([p("b")]));
    edges.insert(p("b"), BTreeSet::from([p("c")]));
    edges.insert(p("c"), BTreeSet::from([p("a")]));
    assert_eq!(find_cycle(&edges), Some(vec![p("a"), p("b"), p("c")]));
    edges.insert(p("c"), BTreeSet::new());
    assert_eq!(find_cycle(&edges), None);
    let found: Vec<(&str, Vec<&str>)> = paths(
        "pub(super) mod child;\nuse crate::a::{b::C, d, e::{f, g::H}, self};\nfn f() { super::x(); child::y(); other::z(); }",
    );
    assert_eq!(
        found,
        vec![
            ("crate", vec!["a", "b", "C"]),
            ("crate", vec!["a", "d"]),
            ("crate", vec!["a", "e", "f"]),
            ("crate", vec!["a", "e", "g", "H"]),
            ("crate", vec!["a", "e"]),
            ("crate", vec!["a"]),
            ("crate", vec!["a"]),
            ("super", vec!["x"]),
            ("child", vec!["y"]),
        ]
    );
}

#[test]
fn long_modules_say_why_they_are_one_file() {
    let mut long = Vec::new();
    for k in crates() {
        let mut files = Vec::new();
        rust_files(&k.src, &mut files);
        for f in files {
            let text = std::fs::read_to_string(&f).expect("source");
            let lines = text.split(TESTS).next().unwrap_or_default().lines().count();
            let doc: String = text
                .lines()
                .take_while(|l| l.starts_with("//!"))
                .collect::<Vec<_>>()
                .join(" ")
                .to_lowercase();
            if lines > MAX_LINES && !doc.contains(ONE_FILE) {
                long.push(format!("{} ({lines} lines)", f.display()));
            }
        }
    }
    assert!(
        long.is_empty(),
        "modules over {MAX_LINES} lines whose doc does not say they are {ONE_FILE:?} and why: {long:?}"
    );
}
