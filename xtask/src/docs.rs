//! `cargo xtask docs`: the documentation agrees with the code, checked by machine.
//!
//! - The README's "Crates and features" table lists exactly the workspace's crates (but the
//!   internal ones, [`INTERNAL`]) and, for each, exactly the features of its `Cargo.toml`, with
//!   `(default)` beside exactly the default ones.
//! - Every test named in the matrix of `tests/RELIABILITY.md` exists.
//! - No file refers to a folder outside the repository that the project once lived beside.
//! - `cargo doc` of the whole workspace, every feature on, has no warning.
//!
//! Manifests are read with a few lines of string handling, not a TOML parser: xtask has no
//! dependencies, and the manifests use plain `key = value` lines.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use crate::run::{cargo, step, workspace_root};

/// Workspace members that are tooling, not crates users depend on: the README leaves them out.
const INTERNAL: &[&str] = &["xtask", "lock-tests"];

/// The heading of the README's table of crates and features.
const CRATES_HEADING: &str = "## Crates and features";

pub(crate) fn run(args: &[String]) -> Result<(), String> {
    if let Some(unknown) = args.first() {
        return Err(format!("`docs` takes no arguments, got `{unknown}`"));
    }
    check_all()
}

/// The checks and `cargo doc`, as `cargo xtask it` runs them.
pub(crate) fn check_all() -> Result<(), String> {
    println!("\n== docs agree with the manifests and tests");
    let root = workspace_root();
    let mut problems = Vec::new();
    problems.extend(check_crates_table(&root)?);
    problems.extend(check_reliability_tests(&root)?);
    problems.extend(check_no_outside_references(&root)?);
    if !problems.is_empty() {
        for problem in &problems {
            eprintln!("docs: {problem}");
        }
        return Err(format!(
            "docs disagree with the code in {} place(s)",
            problems.len()
        ));
    }
    println!("== docs agree with the manifests and tests: ok");
    step(
        "RUSTDOCFLAGS=\"-D warnings\" cargo doc --workspace --no-deps --all-features",
        cargo()
            .args(["doc", "--workspace", "--no-deps", "--all-features"])
            .env("RUSTDOCFLAGS", "-D warnings"),
    )
}

/// One crate as its manifest describes it.
#[derive(Debug, Default, PartialEq, Eq)]
struct Manifest {
    name: String,
    features: BTreeSet<String>,
    defaults: BTreeSet<String>,
}

fn read(path: &Path) -> Result<String, String> {
    fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

fn check_crates_table(root: &Path) -> Result<Vec<String>, String> {
    let mut manifests = BTreeMap::new();
    for member in workspace_members(&read(&root.join("Cargo.toml"))?) {
        let path = root.join(&member).join("Cargo.toml");
        let manifest = parse_manifest(&read(&path)?)
            .ok_or_else(|| format!("{}: no `name` in [package]", path.display()))?;
        if !INTERNAL.contains(&manifest.name.as_str()) {
            manifests.insert(manifest.name.clone(), manifest);
        }
    }
    let readme = read(&root.join("README.md"))?;
    Ok(compare_crates_table(&readme, &manifests))
}

/// The `members = [..]` of the root manifest.
fn workspace_members(root_manifest: &str) -> Vec<String> {
    let Some(start) = root_manifest.find("members") else {
        return Vec::new();
    };
    let rest = &root_manifest[start..];
    let (Some(open), Some(close)) = (rest.find('['), rest.find(']')) else {
        return Vec::new();
    };
    quoted_strings(&rest[open + 1..close])
}

/// The strings between double quotes in `text`.
fn quoted_strings(text: &str) -> Vec<String> {
    text.split('"')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

/// The package name, features and default features of a member's manifest.
fn parse_manifest(text: &str) -> Option<Manifest> {
    let mut manifest = Manifest::default();
    let mut section = "";
    let mut value_of_default = String::new();
    let mut in_default = false;
    for line in text.lines() {
        let line = line.trim();
        if in_default {
            value_of_default.push_str(line);
            in_default = !line.contains(']');
            continue;
        }
        if line.starts_with('[') {
            section = line;
            continue;
        }
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let (key, value) = (key.trim(), value.trim());
        match section {
            "[package]" if key == "name" => {
                manifest.name = quoted_strings(value).into_iter().next()?;
            }
            "[features]" if key == "default" => {
                value_of_default.push_str(value);
                in_default = !value.contains(']');
            }
            "[features]" => {
                manifest.features.insert(key.to_owned());
            }
            _ => {}
        }
    }
    manifest.defaults = quoted_strings(&value_of_default).into_iter().collect();
    (!manifest.name.is_empty()).then_some(manifest)
}

/// One row of the README's table: the crate, its features, and those marked `(default)`.
#[derive(Debug, PartialEq, Eq)]
struct Row {
    name: String,
    features: BTreeSet<String>,
    defaults: BTreeSet<String>,
}

/// The rows of the table under [`CRATES_HEADING`]: crate in the first column, features in the
/// last, as a comma-separated list whose entries each start with a backticked feature name
/// (`` `tls`: TLS through rustls ``, `` `memory` (default), `full` (all, plus TLS) ``), or `—`.
fn crates_table(readme: &str) -> Option<Vec<Row>> {
    let section = &readme[readme.find(CRATES_HEADING)? + CRATES_HEADING.len()..];
    let rows = section
        .lines()
        .skip_while(|line| !line.starts_with('|'))
        .take_while(|line| line.starts_with('|'))
        .skip(2) // the header and the `|---|` line
        .filter_map(|line| {
            let cells: Vec<&str> = line.trim().trim_matches('|').split('|').collect();
            let name = first_backticked(cells.first()?.trim())?;
            let mut row = Row {
                name: name.to_owned(),
                features: BTreeSet::new(),
                defaults: BTreeSet::new(),
            };
            for entry in cells.last()?.trim().split(", ") {
                let Some(feature) = entry.strip_prefix('`').and_then(|e| e.split('`').next())
                else {
                    continue;
                };
                row.features.insert(feature.to_owned());
                if entry.contains("(default)") {
                    row.defaults.insert(feature.to_owned());
                }
            }
            Some(row)
        })
        .collect();
    Some(rows)
}

fn first_backticked(text: &str) -> Option<&str> {
    text.split('`').nth(1)
}

fn compare_crates_table(readme: &str, manifests: &BTreeMap<String, Manifest>) -> Vec<String> {
    let Some(rows) = crates_table(readme) else {
        return vec![format!("README.md has no `{CRATES_HEADING}` table")];
    };
    let mut problems = Vec::new();
    let listed: BTreeSet<&str> = rows.iter().map(|row| row.name.as_str()).collect();
    for name in manifests.keys() {
        if !listed.contains(name.as_str()) {
            problems.push(format!(
                "README.md `{CRATES_HEADING}`: the workspace crate `{name}` is missing"
            ));
        }
    }
    for row in &rows {
        let Some(manifest) = manifests.get(&row.name) else {
            problems.push(format!(
                "README.md `{CRATES_HEADING}`: `{}` is not a crate of the workspace",
                row.name
            ));
            continue;
        };
        if row.features != manifest.features {
            problems.push(format!(
                "README.md `{CRATES_HEADING}`: `{}` lists the features {:?}, but {}/Cargo.toml has {:?}",
                row.name, row.features, row.name, manifest.features
            ));
        }
        if row.defaults != manifest.defaults {
            problems.push(format!(
                "README.md `{CRATES_HEADING}`: `{}` marks {:?} as (default), but its Cargo.toml's default features are {:?}",
                row.name, row.defaults, manifest.defaults
            ));
        }
    }
    problems
}

/// Every test named in the last column of `tests/RELIABILITY.md`'s tables is a `fn` somewhere.
fn check_reliability_tests(root: &Path) -> Result<Vec<String>, String> {
    let matrix = read(&root.join("tests/RELIABILITY.md"))?;
    let mut sources = String::new();
    for file in files(root)? {
        if file.extension().is_some_and(|ext| ext == "rs") {
            sources.push_str(&read(&file)?);
            sources.push('\n');
        }
    }
    let mut problems = Vec::new();
    for name in matrix_tests(&matrix) {
        if !sources.contains(&format!("fn {name}(")) {
            problems.push(format!(
                "tests/RELIABILITY.md names the test `{name}`, which does not exist"
            ));
        }
    }
    Ok(problems)
}

/// The backticked names in the last column of every table row (but headers).
fn matrix_tests(matrix: &str) -> Vec<String> {
    matrix
        .lines()
        .filter(|line| {
            line.starts_with('|') && !line.starts_with("|---") && !line.starts_with("| #")
        })
        .filter_map(|line| line.trim().trim_matches('|').rsplit('|').next())
        .flat_map(|cell| {
            cell.split('`')
                .skip(1)
                .step_by(2)
                .filter(|name| !name.ends_with(".rs"))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Nothing points at the folder beside the checkout where the project's notes once lived: the
/// repository must stand alone.
fn check_no_outside_references(root: &Path) -> Result<Vec<String>, String> {
    // Built from parts, so that this file does not match itself.
    let needles = [format!("..{}shared", '/'), format!("/work{}shared", '/')];
    let mut problems = Vec::new();
    for file in files(root)? {
        let Ok(bytes) = fs::read(&file) else { continue };
        let text = String::from_utf8_lossy(&bytes);
        for needle in &needles {
            if text.contains(needle.as_str()) {
                let shown = file.strip_prefix(root).unwrap_or(&file);
                problems.push(format!(
                    "{} refers to `{needle}`, outside the repository",
                    shown.display()
                ));
            }
        }
    }
    Ok(problems)
}

/// Every file of the repository: everything under the root but `.git` and `target`.
fn files(root: &Path) -> Result<Vec<PathBuf>, String> {
    let mut pending = vec![root.to_path_buf()];
    let mut found = Vec::new();
    while let Some(dir) = pending.pop() {
        let entries =
            fs::read_dir(&dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
        for entry in entries {
            let entry = entry.map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
            let path = entry.path();
            let name = entry.file_name();
            let file_type = entry
                .file_type()
                .map_err(|e| format!("cannot stat {}: {e}", path.display()))?;
            if name == ".git" || (file_type.is_dir() && name == "target") {
                continue;
            }
            if file_type.is_dir() {
                pending.push(path);
            } else if file_type.is_file() {
                found.push(path);
            }
        }
    }
    found.sort();
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MANIFEST: &str = r#"
[package]
name = "lock-facade"
version.workspace = true

[features]
default = ["memory"]
## The in-process backend.
memory = ["dep:lock-memory"]
redlock = ["dep:lock-redlock"]
full = ["memory", "redlock"]

[dependencies]
name-like = "1"
"#;

    const README: &str = "\
# x

## Crates and features

| crate | what it gives you | cargo features |
|---|---|---|
| `lock-core` | the `Lock` trait, `Locker` | `conformance`: the test suite |
| `lock-facade` | `create(config)` | `memory` (default), `redlock`, `full` (all, plus TLS) |

## Next
| not | a | row |
";

    fn manifests(readme_core_features: &[&str]) -> BTreeMap<String, Manifest> {
        let facade = parse_manifest(MANIFEST).expect("a name");
        let core = Manifest {
            name: "lock-core".to_owned(),
            features: readme_core_features
                .iter()
                .map(|f| (*f).to_owned())
                .collect(),
            defaults: BTreeSet::new(),
        };
        BTreeMap::from([(core.name.clone(), core), (facade.name.clone(), facade)])
    }

    #[test]
    fn a_manifest_gives_its_name_features_and_defaults() {
        let manifest = parse_manifest(MANIFEST).expect("a name");
        assert_eq!(manifest.name, "lock-facade");
        assert_eq!(
            manifest.features.iter().collect::<Vec<_>>(),
            ["full", "memory", "redlock"]
        );
        assert_eq!(manifest.defaults.iter().collect::<Vec<_>>(), ["memory"]);
    }

    #[test]
    fn members_are_read_from_the_root_manifest() {
        let root =
            "[workspace]\nresolver = \"3\"\nmembers = [\n    \"lock-core\",\n    \"xtask\",\n]\n";
        assert_eq!(workspace_members(root), ["lock-core", "xtask"]);
    }

    #[test]
    fn a_table_that_agrees_passes() {
        assert_eq!(
            compare_crates_table(README, &manifests(&["conformance"])),
            Vec::<String>::new()
        );
    }

    #[test]
    fn a_table_that_disagrees_fails_and_says_where() {
        let missing_feature = compare_crates_table(README, &manifests(&["conformance", "tls"]));
        assert_eq!(missing_feature.len(), 1, "{missing_feature:?}");
        assert!(missing_feature[0].contains("`lock-core` lists the features {\"conformance\"}, but lock-core/Cargo.toml has {\"conformance\", \"tls\"}"), "{missing_feature:?}");

        let no_default = README.replace("`memory` (default)", "`memory`");
        let problems = compare_crates_table(&no_default, &manifests(&["conformance"]));
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].contains("marks {} as (default)"),
            "{problems:?}"
        );

        let mut more = manifests(&["conformance"]);
        more.insert(
            "lock-new".to_owned(),
            Manifest {
                name: "lock-new".to_owned(),
                ..Manifest::default()
            },
        );
        let problems = compare_crates_table(README, &more);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].contains("`lock-new` is missing"),
            "{problems:?}"
        );
    }

    #[test]
    fn the_matrix_names_its_tests_in_the_last_column() {
        let matrix = "| # | Fault | Test |\n|---|---|---|\n| R1 | none, `x` | `a_test` (`file.rs`), `other_test` |\n";
        assert_eq!(matrix_tests(matrix), ["a_test", "other_test"]);
    }
}
