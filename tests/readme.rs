//! Keeps README.md honest: every shell block in it must say what exercises it, and that
//! must exist — `.ci/run` (which extracts and runs the marked prerequisite, main-job and
//! test commands, and must contain every other `ci` block verbatim) or a named test.
//!
//! Markers, on the line before a ```sh block:
//! `<!-- prereq-command -->`, `<!-- main-command -->`, `<!-- test-command -->` (run by
//! `.ci/run`), `<!-- checked-by: ci -->` (its lines appear in `.ci/run`), or
//! `<!-- checked-by: tests/FILE.rs::test_name -->`.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// (marker line before it, lines of the block) for each ```sh block.
fn sh_blocks(readme: &str) -> Vec<(String, Vec<String>)> {
    let lines: Vec<&str> = readme.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if lines[i].trim_start().starts_with("```sh") {
            let marker = if i > 0 { lines[i - 1].trim() } else { "" };
            let mut body = Vec::new();
            i += 1;
            while i < lines.len() && !lines[i].trim_start().starts_with("```") {
                body.push(lines[i].trim().to_owned());
                i += 1;
            }
            out.push((marker.to_owned(), body));
        }
        i += 1;
    }
    out
}

#[test]
fn every_readme_command_block_is_exercised() {
    let root = root();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let ci = std::fs::read_to_string(root.join(".ci/run")).unwrap();
    let blocks = sh_blocks(&readme);
    assert!(blocks.len() >= 3, "README has its command blocks");
    for m in ["prereq-command", "main-command", "test-command"] {
        let tag = format!("<!-- {m} -->");
        assert_eq!(
            blocks.iter().filter(|(k, _)| *k == tag).count(),
            1,
            "README has exactly one {tag} block"
        );
        assert!(ci.contains(m), ".ci/run runs the README's {m}");
    }
    for (marker, body) in &blocks {
        let what = body.join(" / ");
        if ["prereq-command", "main-command", "test-command"]
            .iter()
            .any(|m| *marker == format!("<!-- {m} -->"))
        {
            continue;
        }
        let checked = marker
            .strip_prefix("<!-- checked-by:")
            .and_then(|m| m.strip_suffix("-->"))
            .map(str::trim)
            .unwrap_or_else(|| panic!("block `{what}` has no checked-by marker before it"));
        if checked == "ci" {
            for line in body.iter().filter(|l| !l.is_empty() && !l.starts_with('#')) {
                assert!(ci.contains(line.as_str()), ".ci/run does not run `{line}`");
            }
            continue;
        }
        let (file, test) = checked
            .split_once("::")
            .unwrap_or_else(|| panic!("bad marker {marker}"));
        let src = std::fs::read_to_string(root.join(file))
            .unwrap_or_else(|e| panic!("{file} (marker of `{what}`): {e}"));
        assert!(
            src.contains(&format!("fn {test}(")),
            "{file} has no test {test} (marker of `{what}`)"
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
}
