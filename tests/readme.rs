//! Keeps README.md and the pages of docs/ honest: every shell block in them must say what
//! exercises it, and that must exist — `.ci/run` (which extracts and runs the README's marked
//! prerequisite, main-job and test commands, and must contain every other `ci` block
//! verbatim) or a named test. And every Rust snippet in them must be one of the client
//! library's documentation examples (which `cargo test` compiles), or lines of code, in
//! order, of one example program of `client-lib/examples/` (which `cargo build --examples`
//! and `cargo test` build), so none can rot.
//!
//! Markers, on the line before a ```sh block:
//! `<!-- prereq-command -->`, `<!-- main-command -->`, `<!-- test-command -->` (README.md
//! only, once each; run by `.ci/run`), `<!-- checked-by: ci -->` (its lines appear in
//! `.ci/run`), or `<!-- checked-by: tests/FILE.rs::test_name -->`.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

/// The README's own markers: `.ci/run` extracts the blocks after them.
const RUN_MARKERS: [&str; 3] = ["prereq-command", "main-command", "test-command"];

fn root() -> PathBuf {
    memshadow_tests::repo_root()
}

/// README.md and every Markdown page of docs/, as (path relative to the root, text).
fn pages() -> Vec<(String, String)> {
    let root = root();
    let mut names = vec!["README.md".to_owned()];
    let mut docs: Vec<String> = std::fs::read_dir(root.join("docs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".md"))
        .map(|n| format!("docs/{n}"))
        .collect();
    docs.sort();
    names.extend(docs);
    names
        .into_iter()
        .map(|n| {
            let text = std::fs::read_to_string(root.join(&n)).unwrap();
            (n, text)
        })
        .collect()
}

/// (marker line before it, lines of the block) for each fenced block whose info string
/// starts with `lang`.
fn blocks(md: &str, lang: &str) -> Vec<(String, Vec<String>)> {
    let fence = format!("```{lang}");
    let lines: Vec<&str> = md.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if lines[i].trim_start().starts_with(&fence) {
            let marker = if i > 0 { lines[i - 1].trim() } else { "" };
            let mut body = Vec::new();
            i += 1;
            while i < lines.len() && !lines[i].trim_start().starts_with("```") {
                body.push(lines[i].trim().to_owned());
                i += 1;
            }
            out.push((marker.to_owned(), body));
        } else if lines[i].trim_start().starts_with("```") {
            // Skip any other fenced block whole, so its closing fence is not taken for an
            // opening one.
            i += 1;
            while i < lines.len() && !lines[i].trim_start().starts_with("```") {
                i += 1;
            }
        }
        i += 1;
    }
    out
}

/// (marker line before it, lines of the block) for each ```sh block.
fn sh_blocks(md: &str) -> Vec<(String, Vec<String>)> {
    blocks(md, "sh")
}

fn is_run_marker(marker: &str) -> bool {
    RUN_MARKERS
        .iter()
        .any(|m| marker == format!("<!-- {m} -->"))
}

#[test]
fn every_readme_command_block_is_exercised() {
    let root = root();
    let ci = std::fs::read_to_string(root.join(".ci/run")).unwrap();
    let pages = pages();
    assert!(pages.len() > 1, "docs/ has pages");
    for (page, text) in &pages {
        let blocks = sh_blocks(text);
        if page == "README.md" {
            assert!(blocks.len() >= 3, "README has its command blocks");
            for m in RUN_MARKERS {
                let tag = format!("<!-- {m} -->");
                assert_eq!(
                    blocks.iter().filter(|(k, _)| *k == tag).count(),
                    1,
                    "README has exactly one {tag} block"
                );
                assert!(ci.contains(m), ".ci/run runs the README's {m}");
            }
        }
        for (marker, body) in &blocks {
            let what = format!("{page}: `{}`", body.join(" / "));
            if is_run_marker(marker) {
                assert_eq!(
                    page, "README.md",
                    "{what}: {marker} belongs in README.md, where .ci/run looks for it"
                );
                continue;
            }
            let checked = marker
                .strip_prefix("<!-- checked-by:")
                .and_then(|m| m.strip_suffix("-->"))
                .map(str::trim)
                .unwrap_or_else(|| panic!("block {what} has no checked-by marker before it"));
            if checked == "ci" {
                for line in body.iter().filter(|l| !l.is_empty() && !l.starts_with('#')) {
                    assert!(
                        ci.contains(line.as_str()),
                        ".ci/run does not run `{line}` ({page})"
                    );
                }
                continue;
            }
            let (file, test) = checked
                .split_once("::")
                .unwrap_or_else(|| panic!("bad marker {marker} ({page})"));
            let src = std::fs::read_to_string(root.join(file))
                .unwrap_or_else(|e| panic!("{file} (marker of {what}): {e}"));
            assert!(
                src.contains(&format!("fn {test}(")),
                "{file} has no test {test} (marker of {what})"
            );
        }
    }
}

/// The code of every documentation example (```` ```no_run ````, ```` ``` ```` or
/// ```` ```rust ```` blocks of `///` and `//!` comments) in `src`, without its hidden
/// (`# `) lines, each line trimmed.
fn doc_examples(src: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut cur: Option<Vec<String>> = None;
    for line in src.lines() {
        let t = line.trim_start();
        let Some(doc) = t.strip_prefix("//!").or_else(|| t.strip_prefix("///")) else {
            continue;
        };
        let doc = doc.strip_prefix(' ').unwrap_or(doc);
        if let Some(fence) = doc.trim().strip_prefix("```") {
            match cur.take() {
                Some(body) => out.push(body),
                None if matches!(fence, "" | "rust" | "no_run" | "rust,no_run") => {
                    cur = Some(Vec::new())
                }
                None => {}
            }
            continue;
        }
        if let Some(body) = &mut cur {
            if doc.trim() != "#" && !doc.trim_start().starts_with("# ") {
                body.push(doc.trim().to_owned());
            }
        }
    }
    out
}

/// A line of Rust without its `//` comment, trimmed (a `//` inside a string cuts it too,
/// which only makes a match less likely).
fn code_of(line: &str) -> &str {
    line.find("//").map_or(line, |i| &line[..i]).trim()
}

/// The lines of code of `src`: comments dropped, trimmed, blank ones left out.
fn code_lines(src: &str) -> Vec<String> {
    src.lines()
        .map(code_of)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

/// True if every line of `want` is a line of `have`, in the same order.
fn in_order(want: &[String], have: &[String]) -> bool {
    let mut have = have.iter();
    want.iter().all(|w| have.any(|h| h == w))
}

/// The Rust example programs of client-lib/examples/, as (path, code lines).
fn example_programs() -> Vec<(String, Vec<String>)> {
    let dir = root().join("client-lib/examples");
    let mut out: Vec<(String, Vec<String>)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "rs"))
        .map(|p| {
            let name = format!(
                "client-lib/examples/{}",
                p.file_name().unwrap().to_string_lossy()
            );
            (name, code_lines(&std::fs::read_to_string(&p).unwrap()))
        })
        .collect();
    out.sort();
    out
}

#[test]
fn rust_snippets_are_the_librarys_doc_examples() {
    let root = root();
    let lib = std::fs::read_to_string(root.join("client-lib/src/lib.rs")).unwrap();
    let examples = doc_examples(&lib);
    assert!(
        examples.len() >= 2,
        "client-lib/src/lib.rs has its doc examples"
    );
    let programs = example_programs();
    assert!(
        programs.iter().any(|(p, _)| p.ends_with("/engine.rs")),
        "client-lib/examples/engine.rs is found"
    );
    let mut seen = 0;
    let mut from_programs = 0;
    for (page, text) in pages() {
        for (_, body) in blocks(&text, "rust") {
            seen += 1;
            if examples.contains(&body) {
                continue;
            }
            let code = code_lines(&body.join("\n"));
            let found = !code.is_empty() && programs.iter().any(|(_, have)| in_order(&code, have));
            assert!(
                found,
                "a Rust snippet of {page} is neither a doc example of client-lib/src/lib.rs nor \
                 lines of code, in order, of one program of client-lib/examples/ (make it one, \
                 so that cargo compiles it):\n{}",
                body.join("\n")
            );
            from_programs += 1;
        }
    }
    assert!(seen >= 2, "the README and docs/usage.md show the library");
    assert!(
        from_programs >= 1,
        "the README's external-engine snippet comes from an example program"
    );
}

#[test]
fn snippet_lines_are_matched_in_order_without_comments() {
    let have =
        code_lines("fn f() {\n    let a = 1; // one\n\n    // a comment\n    let b = a + 1;\n}\n");
    assert_eq!(have, ["fn f() {", "let a = 1;", "let b = a + 1;", "}"]);
    let want = code_lines("let a = 1;          // another comment\nlet b = a + 1;");
    assert!(in_order(&want, &have));
    let reversed: Vec<String> = want.iter().rev().cloned().collect();
    assert!(!in_order(&reversed, &have), "order matters");
    assert!(!in_order(&code_lines("let c = 2;"), &have));
}

/// The README's section on external engines says what an evicted engine can still see, and
/// why that is the limit, and points to docs/engines.md.
#[test]
fn the_readme_says_what_an_evicted_engine_can_still_see() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let at = readme
        .find("\n## External engines\n")
        .expect("README.md has a section \"External engines\"");
    let section = &readme[at + 1..];
    let section = &section[..section[1..].find("\n## ").map_or(section.len(), |i| i + 1)];
    let flat = section.split_whitespace().collect::<Vec<_>>().join(" ");
    for want in [
        "](docs/engines.md)",
        "What an evicted engine can still see:",
        "of that same client",
        "nothing of any other client",
        "the limit of what user space can enforce",
        "device.engine_ack_timeout_ms",
        "memshadowctl engines",
        "client-lib/examples/engine.rs",
    ] {
        assert!(
            flat.contains(want),
            "{want:?} in README's External engines:\n{section}"
        );
    }
}

#[test]
fn the_block_parser_sees_markers() {
    let md = "x\n<!-- checked-by: ci -->\n```sh\nfoo --bar\n```\n```rust\nno\n```\n";
    assert_eq!(
        sh_blocks(md),
        vec![(
            "<!-- checked-by: ci -->".to_owned(),
            vec!["foo --bar".to_owned()]
        )]
    );
    let rust: Vec<Vec<String>> = blocks(md, "rust").into_iter().map(|(_, b)| b).collect();
    assert_eq!(rust, vec![vec!["no".to_owned()]]);
}

#[test]
fn doc_examples_drop_hidden_lines() {
    let src = "//! ```no_run\n//! # fn main() {\n//! let a = 1;\n//! # }\n//! ```\n\
               /// ```compile_fail\n/// nope\n/// ```\n";
    assert_eq!(doc_examples(src), vec![vec!["let a = 1;".to_owned()]]);
}

/// `systemd/install.sh` builds with the README's main-job build, word for word, so that one
/// build serves both: building examples turns on the dev-dependencies' features for the crates
/// the binaries share with them, so any other selection of targets builds them again.
#[test]
fn install_sh_runs_the_main_jobs_build() {
    let root = root();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let main = sh_blocks(&readme)
        .into_iter()
        .find(|(m, _)| m == "<!-- main-command -->")
        .map(|(_, body)| body.join(" "))
        .expect("README.md has a main command");
    let build = main
        .split("&&")
        .map(str::trim)
        .find(|c| c.starts_with("cargo build"))
        .expect("the main command starts with a cargo build");
    let script = std::fs::read_to_string(root.join("systemd/install.sh")).unwrap();
    let set = script
        .lines()
        .find_map(|l| l.strip_prefix("BUILD_CMD=\""))
        .and_then(|l| l.strip_suffix('"'))
        .expect("systemd/install.sh sets BUILD_CMD=\"...\"");
    assert_eq!(
        set, build,
        "systemd/install.sh must build exactly as the README's main job does"
    );
    assert!(
        script.contains("$BUILD_CMD)"),
        "systemd/install.sh runs $BUILD_CMD"
    );
    assert!(
        build.contains("--lib") && build.contains("--bins") && build.contains("--examples"),
        "the one build makes the C library, the binaries and the demo: {build}"
    );
}
