//! Keeps the repository's documents and source comments about the repository itself.
//!
//! It reads every Markdown file and the comments of every source file (`*.rs`, `*.h`,
//! `*.c`, `*.sh`, `*.toml`, `*.service`, `*.socket`; `target/` and `.git/` skipped) and
//! fails, naming each offending `file:line`, on:
//!
//! * (a) a path or link that leaves the repository: the project's shared folder beside the
//!   checkout, a relative path that climbs above the root, an absolute path into a home or
//!   work directory;
//! * (b) a reference to the design brief by its old file name instead of `docs/design.md`
//!   (its own test, so its state is plain while the code's references are rewritten);
//! * (c) a section (`§N`), guarantee (`GN`) or notifier rule (`rule N`) that has no heading
//!   in `docs/design.md`;
//! * (d) a relative Markdown link to a file (or a heading anchor) that does not exist, a
//!   `docs/….md` path named in a comment that does not exist, and a test named in Markdown
//!   (`tests/e2e.rs::g5_a_killed_client_frees_everything`) that its file does not have.
//!
//! `docs/design.md` must keep its numbering: sections 1 to 8, "Rule 1" to "Rule 9" in §3,
//! "G1" to "G7" in §5, each heading once.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};

fn root() -> PathBuf {
    memshadow_tests::repo_root()
}

/// Source files whose comments are read, by extension.
const SOURCE_EXTS: [&str; 7] = ["rs", "h", "c", "sh", "toml", "service", "socket"];

/// The old name of the design brief, spelt so that this file does not contain it.
fn old_design_name() -> String {
    ["DESIGN", ".md"].concat()
}

/// Text that always points outside the repository.
fn outside_markers() -> Vec<String> {
    vec![
        ["..", "/shared"].concat(),
        ["/wo", "rk/"].concat(),
        ["/ho", "me/"].concat(),
        ["/ro", "ot/"].concat(),
    ]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Markdown,
    /// Comments start with `//` or sit in `/* */`.
    Slashes,
    /// Comments start with `#`.
    Hash,
}

fn kind_of(path: &Path) -> Option<Kind> {
    let ext = path.extension()?.to_str()?;
    if ext == "md" {
        return Some(Kind::Markdown);
    }
    if !SOURCE_EXTS.contains(&ext) {
        return None;
    }
    Some(match ext {
        "rs" | "h" | "c" => Kind::Slashes,
        _ => Kind::Hash,
    })
}

/// Every file of the repository this test reads, relative to the root, sorted.
fn files(root: &Path) -> Vec<(PathBuf, Kind)> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(PathBuf, Kind)>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap())
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let name = e.file_name();
            let ty = e.file_type().unwrap();
            let path = e.path();
            if ty.is_dir() {
                if name != "target" && name != ".git" {
                    walk(root, &path, out);
                }
            } else if ty.is_file() {
                if let Some(k) = kind_of(&path) {
                    out.push((path.strip_prefix(root).unwrap().to_owned(), k));
                }
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out
}

/// One line of text the checks read: a Markdown line, or the comment part of a source line.
#[derive(Debug, Clone)]
struct Line {
    file: PathBuf,
    no: usize,
    text: String,
}

impl Line {
    fn at(&self) -> String {
        format!("{}:{}", self.file.display(), self.no)
    }
}

/// The position where a `marker` comment starts in `line`, outside string literals.
fn comment_start(line: &str, marker: &str) -> Option<usize> {
    let mut in_str = false;
    let mut escaped = false;
    for (i, c) in line.char_indices() {
        if escaped {
            escaped = false;
            continue;
        }
        match c {
            '\\' if in_str => escaped = true,
            '"' => in_str = !in_str,
            _ if !in_str && line[i..].starts_with(marker) => return Some(i),
            _ => {}
        }
    }
    None
}

/// The comments of a source file, as (line number, comment text).
fn comments(text: &str, kind: Kind) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut in_block = false;
    for (i, line) in text.lines().enumerate() {
        let no = i + 1;
        match kind {
            Kind::Markdown => out.push((no, line.to_owned())),
            Kind::Hash => {
                if let Some(p) = comment_start(line, "#") {
                    out.push((no, line[p..].to_owned()));
                }
            }
            Kind::Slashes => {
                let mut rest = line;
                let mut taken = String::new();
                loop {
                    if in_block {
                        match rest.find("*/") {
                            Some(e) => {
                                taken.push_str(&rest[..e]);
                                rest = &rest[e + 2..];
                                in_block = false;
                            }
                            None => {
                                taken.push_str(rest);
                                break;
                            }
                        }
                    }
                    let line_c = comment_start(rest, "//");
                    let block_c = comment_start(rest, "/*");
                    match (line_c, block_c) {
                        (Some(l), b) if b.is_none_or(|b| l < b) => {
                            taken.push_str(&rest[l..]);
                            break;
                        }
                        (_, Some(b)) => {
                            in_block = true;
                            rest = &rest[b + 2..];
                        }
                        _ => break,
                    }
                }
                if !taken.is_empty() {
                    out.push((no, taken));
                }
            }
        }
    }
    out
}

/// Every line the checks read, from every file.
fn lines(root: &Path) -> Vec<Line> {
    let mut out = Vec::new();
    for (file, kind) in files(root) {
        let text = std::fs::read_to_string(root.join(&file)).unwrap_or_default();
        for (no, text) in comments(&text, kind) {
            out.push(Line {
                file: file.clone(),
                no,
                text,
            });
        }
    }
    out
}

/// Fails with every violation, one per line.
fn report(what: &str, bad: &[String]) {
    assert!(bad.is_empty(), "{} {what}:\n{}", bad.len(), bad.join("\n"));
}

/// The lines of a Markdown text outside fenced code blocks, as (line number, text).
fn prose(md: &str) -> Vec<(usize, &str)> {
    let mut out = Vec::new();
    let mut fenced = false;
    for (i, line) in md.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if !fenced {
            out.push((i + 1, line));
        }
    }
    out
}

/// The headings of a Markdown text: (level, text).
fn headings(md: &str) -> Vec<(usize, String)> {
    prose(md)
        .into_iter()
        .filter_map(|(_, l)| {
            let level = l.bytes().take_while(|&b| b == b'#').count();
            let text = l.get(level..)?.strip_prefix(' ')?;
            (level > 0).then(|| (level, text.trim().to_owned()))
        })
        .collect()
}

/// GitHub's anchor of a heading: lower case, letters, digits, `-` and `_` kept, spaces
/// made `-`, everything else dropped.
fn slug(heading: &str) -> String {
    heading
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// The anchors of a Markdown text (duplicates get `-1`, `-2`, … as on GitHub).
fn anchors(md: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (_, h) in headings(md) {
        let base = slug(&h);
        let mut s = base.clone();
        let mut n = 0;
        while out.contains(&s) {
            n += 1;
            s = format!("{base}-{n}");
        }
        out.insert(s);
    }
    out
}

/// What `docs/design.md` has headings for.
#[derive(Debug, Default)]
struct Design {
    sections: Vec<u32>,
    rules: Vec<u32>,
    guarantees: Vec<u32>,
}

fn design(md: &str) -> Design {
    let mut d = Design::default();
    for (level, h) in headings(md) {
        let num = |s: &str| -> Option<u32> {
            let digits: String = s.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        };
        match level {
            2 => {
                if let Some(n) = h.split_once(". ").and_then(|(n, _)| num(n)) {
                    d.sections.push(n);
                }
            }
            3 => {
                if let Some(n) = h.strip_prefix("Rule ").and_then(num) {
                    d.rules.push(n);
                } else if let Some(n) = h.strip_prefix('G').and_then(num) {
                    d.guarantees.push(n);
                }
            }
            _ => {}
        }
    }
    d
}

/// The numbers of a list that starts `text`: `3`, `1–8`, `2, 3, 4 and 6`, `5-7`.
fn numbers_at(text: &str) -> Vec<u32> {
    fn digits(s: &str) -> Option<(u32, &str)> {
        let n = s.chars().take_while(char::is_ascii_digit).count();
        Some((s[..n].parse().ok()?, &s[n..]))
    }
    let mut out = Vec::new();
    let Some((mut last, mut rest)) = digits(text) else {
        return out;
    };
    out.push(last);
    loop {
        let t = rest.trim_start();
        if let Some(r) = t.strip_prefix('–').or_else(|| t.strip_prefix('-')) {
            match digits(r.trim_start()) {
                Some((to, r)) if to >= last && to - last < 100 => {
                    out.extend(last + 1..=to);
                    last = to;
                    rest = r;
                    continue;
                }
                _ => break,
            }
        }
        let next = t
            .strip_prefix(',')
            .or_else(|| t.strip_prefix("and "))
            .or_else(|| t.strip_prefix("or "));
        match next.and_then(|r| digits(r.trim_start())) {
            Some((n, r)) => {
                out.push(n);
                last = n;
                rest = r;
            }
            None => break,
        }
    }
    out
}

fn is_word(c: Option<char>) -> bool {
    c.is_some_and(|c| c.is_alphanumeric() || c == '_')
}

/// The design references of one line: sections, rules, guarantees.
fn references(text: &str) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
    let (mut sections, mut rules, mut gs) = (Vec::new(), Vec::new(), Vec::new());
    for (i, _) in text.match_indices('§') {
        sections.extend(numbers_at(&text[i + '§'.len_utf8()..]));
    }
    let lower = text.to_lowercase();
    for (i, _) in lower.match_indices("rule") {
        if is_word(text[..i].chars().next_back()) {
            continue;
        }
        let rest = &text[i + 4..];
        let rest = rest.strip_prefix('s').unwrap_or(rest);
        if rest.starts_with(' ') {
            rules.extend(numbers_at(rest.trim_start()));
        }
    }
    for (i, _) in text.match_indices('G') {
        if is_word(text[..i].chars().next_back()) {
            continue;
        }
        let rest = &text[i + 1..];
        let n = rest.chars().take_while(char::is_ascii_digit).count();
        if n == 0 || is_word(rest[n..].chars().next()) {
            continue;
        }
        let first: u32 = rest[..n].parse().unwrap_or(0);
        gs.push(first);
        // `G5–G7`
        let after = &rest[n..];
        if let Some(r) = after
            .strip_prefix("–G")
            .or_else(|| after.strip_prefix("-G"))
        {
            let m = r.chars().take_while(char::is_ascii_digit).count();
            if let Ok(last) = r[..m].parse::<u32>() {
                if last > first && last - first < 100 {
                    gs.extend(first + 1..last);
                }
            }
        }
    }
    (sections, rules, gs)
}

/// `path` joined to `dir` and made lexical; `None` if it climbs above the root.
fn resolve(dir: &Path, path: &str) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in dir.join(path).components() {
        match c {
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            Component::CurDir => {}
            Component::Normal(p) => out.push(p),
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// The targets of the Markdown links of one line: `[text](target)` and `[ref]: target`.
fn link_targets(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (i, _) in line.match_indices("](") {
        let rest = &line[i + 2..];
        if let Some(end) = rest.find(')') {
            let t = rest[..end].split_whitespace().next().unwrap_or("");
            out.push(t.trim_matches(|c| c == '<' || c == '>').to_owned());
        }
    }
    let t = line.trim_start();
    if t.starts_with('[') {
        if let Some(p) = t.find("]: ") {
            if let Some(target) = t[p + 3..].split_whitespace().next() {
                out.push(target.to_owned());
            }
        }
    }
    out
}

fn external(target: &str) -> bool {
    ["http://", "https://", "mailto:"]
        .iter()
        .any(|p| target.starts_with(p))
}

/// Relative paths of a line (`../x`) that climb above the root from the file's directory.
fn climbing_paths(file: &Path, text: &str) -> Vec<String> {
    let dir = file.parent().unwrap_or(Path::new(""));
    let mut out = Vec::new();
    for (i, _) in text.match_indices("../") {
        let before = text[..i].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '.' || c == '/' || c == '_') {
            continue;
        }
        let path: String = text[i..]
            .chars()
            .take_while(|c| c.is_alphanumeric() || "._/-".contains(*c))
            .collect();
        if resolve(dir, &path).is_none() {
            out.push(path);
        }
    }
    out
}

#[test]
fn design_numbering_is_stable() {
    let md = std::fs::read_to_string(root().join("docs/design.md")).unwrap();
    let d = design(&md);
    assert_eq!(d.sections, (1..=8).collect::<Vec<_>>(), "sections §1..§8");
    assert_eq!(d.rules, (1..=9).collect::<Vec<_>>(), "Rule 1..Rule 9");
    assert_eq!(d.guarantees, (1..=7).collect::<Vec<_>>(), "G1..G7");
    let a = anchors(&md);
    assert!(a.contains("what-is-seen-when"), "the table has its heading");
}

/// (a)
#[test]
fn nothing_points_outside_the_repository() {
    let root = root();
    let markers = outside_markers();
    let mut bad = Vec::new();
    for l in lines(&root) {
        for m in &markers {
            if l.text.contains(m.as_str()) {
                bad.push(format!("{}: `{m}` leads outside the repository", l.at()));
            }
        }
        for p in climbing_paths(&l.file, &l.text) {
            bad.push(format!("{}: `{p}` climbs above the repository", l.at()));
        }
        if kind_of(&l.file) == Some(Kind::Markdown) {
            for t in link_targets(&l.text) {
                if t.starts_with('/') || t.starts_with("file:") || t.starts_with('~') {
                    bad.push(format!("{}: link to `{t}` is an absolute path", l.at()));
                }
            }
        }
    }
    report("paths or links leave the repository", &bad);
}

/// (b): the repository's design is `docs/design.md`.
#[test]
fn the_design_is_cited_as_docs_design_md() {
    let old = old_design_name();
    let bad: Vec<String> = lines(&root())
        .into_iter()
        .filter(|l| l.text.contains(old.as_str()))
        .map(|l| format!("{}: {}", l.at(), l.text.trim()))
        .collect();
    report(
        &format!("references to {old}: the repository's design is docs/design.md"),
        &bad,
    );
}

/// (c)
#[test]
fn design_references_have_headings() {
    let root = root();
    let d = design(&std::fs::read_to_string(root.join("docs/design.md")).unwrap());
    let mut bad = Vec::new();
    let mut seen = 0;
    for l in lines(&root) {
        let (sections, rules, gs) = references(&l.text);
        seen += sections.len() + rules.len() + gs.len();
        for n in sections.into_iter().filter(|n| !d.sections.contains(n)) {
            bad.push(format!("{}: §{n} is no section of docs/design.md", l.at()));
        }
        for n in rules.into_iter().filter(|n| !d.rules.contains(n)) {
            bad.push(format!("{}: rule {n} is no rule of docs/design.md", l.at()));
        }
        for n in gs.into_iter().filter(|n| !d.guarantees.contains(n)) {
            bad.push(format!(
                "{}: G{n} is no guarantee of docs/design.md",
                l.at()
            ));
        }
    }
    assert!(seen > 50, "the references were found ({seen})");
    report("references without a heading in docs/design.md", &bad);
}

/// (d)
#[test]
fn relative_links_resolve() {
    let root = root();
    let mut bad = Vec::new();
    let mut anchors_of = std::collections::HashMap::new();
    let mut anchors_in = |path: &Path| -> Option<BTreeSet<String>> {
        anchors_of
            .entry(path.to_owned())
            .or_insert_with(|| {
                std::fs::read_to_string(root.join(path))
                    .ok()
                    .map(|t| anchors(&t))
            })
            .clone()
    };
    for (file, kind) in files(&root) {
        let dir = file.parent().unwrap_or(Path::new("")).to_owned();
        let text = std::fs::read_to_string(root.join(&file)).unwrap_or_default();
        let lines: Vec<(usize, String)> = match kind {
            Kind::Markdown => prose(&text)
                .into_iter()
                .map(|(n, l)| (n, l.to_owned()))
                .collect(),
            k => comments(&text, k),
        };
        for (no, line) in lines {
            let at = format!("{}:{no}", file.display());
            // `docs/….md` named anywhere: relative to the root.
            for (i, _) in line.match_indices("docs/") {
                if is_word(line[..i].chars().next_back()) || line[..i].ends_with('/') {
                    continue;
                }
                let name: String = line[i..]
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || "._/-".contains(*c))
                    .collect();
                if name.ends_with(".md") && !root.join(&name).is_file() {
                    bad.push(format!("{at}: {name} does not exist"));
                }
            }
            if kind != Kind::Markdown {
                continue;
            }
            for t in link_targets(&line) {
                if external(&t) || t.is_empty() {
                    continue;
                }
                let (path, frag) = match t.split_once('#') {
                    Some((p, f)) => (p, Some(f)),
                    None => (t.as_str(), None),
                };
                let target = if path.is_empty() {
                    file.clone()
                } else {
                    match resolve(&dir, path) {
                        Some(p) => p,
                        // Reported by `nothing_points_outside_the_repository`.
                        None => continue,
                    }
                };
                if !root.join(&target).exists() {
                    bad.push(format!(
                        "{at}: link to `{t}`: {} does not exist",
                        target.display()
                    ));
                    continue;
                }
                if let (Some(frag), Some("md")) =
                    (frag, target.extension().and_then(|e| e.to_str()))
                {
                    if !anchors_in(&target).unwrap_or_default().contains(frag) {
                        bad.push(format!(
                            "{at}: link to `{t}`: {} has no heading #{frag}",
                            target.display()
                        ));
                    }
                }
            }
        }
    }
    report("links to nothing", &bad);
}

/// `file.rs::name` references in Markdown (the test tables of docs/design.md, say) name a
/// function that exists in that file.
#[test]
fn named_tests_exist() {
    let root = root();
    let mut bad = Vec::new();
    let mut seen = 0;
    for l in lines(&root) {
        if kind_of(&l.file) != Some(Kind::Markdown) {
            continue;
        }
        for (i, _) in l.text.match_indices(".rs::") {
            let path: String = l.text[..i]
                .chars()
                .rev()
                .take_while(|c| c.is_alphanumeric() || "_/-.".contains(*c))
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            let name: String = l.text[i + 5..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            let file = format!("{path}.rs");
            seen += 1;
            match std::fs::read_to_string(root.join(&file)) {
                Ok(src) if src.contains(&format!("fn {name}(")) => {}
                Ok(_) => bad.push(format!("{}: {file} has no fn {name}", l.at())),
                Err(e) => bad.push(format!("{}: {file}: {e}", l.at())),
            }
        }
    }
    assert!(seen > 20, "the test references were found ({seen})");
    report("references to tests that do not exist", &bad);
}

#[test]
fn the_walk_reads_markdown_and_source_comments() {
    let root = root();
    let files = files(&root);
    for want in [
        "README.md",
        "docs/design.md",
        "daemon/src/lib.rs",
        "systemd/memshadowd.service",
    ] {
        assert!(
            files.iter().any(|(f, _)| f == Path::new(want)),
            "{want} is read"
        );
    }
    assert!(
        files.iter().all(|(f, _)| !f.starts_with("target")),
        "target/ is skipped"
    );
}

#[test]
fn comments_are_told_from_code() {
    let rs = "let a = \"// not a comment\"; // a comment\n/* block\nstill */ code /* more */\n";
    assert_eq!(
        comments(rs, Kind::Slashes),
        vec![
            (1, "// a comment".to_owned()),
            (2, " block".to_owned()),
            (3, "still  more ".to_owned()),
        ]
    );
    let toml = "key = \"a # b\" # why\n# whole line\n";
    assert_eq!(
        comments(toml, Kind::Hash),
        vec![(1, "# why".to_owned()), (2, "# whole line".to_owned())]
    );
}

#[test]
fn references_are_parsed_with_their_lists_and_ranges() {
    let (s, r, g) = references("(see §3 rules 1–3, §5 G5–G7, rule 2 and rule 9; G2)");
    assert_eq!(s, vec![3, 5]);
    assert_eq!(r, vec![1, 2, 3, 2, 9]);
    assert_eq!(g, vec![5, 6, 7, 2]);
    let (_, r, g) = references("rules 2, 3, 4 and 6; the path rules; 4 GiB; device.g2_violations");
    assert_eq!(r, vec![2, 3, 4, 6]);
    assert!(g.is_empty());
}

#[test]
fn paths_and_anchors() {
    assert_eq!(
        resolve(Path::new("docs"), "../README.md"),
        Some("README.md".into())
    );
    assert_eq!(resolve(Path::new("docs"), "../../x"), None);
    assert_eq!(
        climbing_paths(Path::new("docs/a.md"), "see ../../x and ../README.md"),
        vec!["../../x".to_owned()]
    );
    assert_eq!(
        slug("8. Consumers outside the daemon"),
        "8-consumers-outside-the-daemon"
    );
    assert_eq!(
        slug("G1 No stale read after return"),
        "g1-no-stale-read-after-return"
    );
    assert_eq!(
        link_targets("a [x](docs/design.md#g1 \"t\") and [y](<b.md>)"),
        vec!["docs/design.md#g1".to_owned(), "b.md".to_owned()]
    );
}
