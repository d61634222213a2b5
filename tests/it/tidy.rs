//! The layout's rules, read off the source tree (as rust-analyzer's `tidy` test does): each
//! driver stays in its backend, every source file is in ARCHITECTURE.md's code map, and every
//! thread starts through `util::spawn`. Comment lines are not read. A failure names the file,
//! the line and what to do.

use std::path::{Path, PathBuf};

/// A driver crate, the paths that may use it, and how a use of it is recognised.
struct Driver {
    what: &'static str,
    home: &'static str,
    uses: fn(&str) -> bool,
}

const DRIVERS: &[Driver] = &[
    Driver {
        what: "the SQLite driver (rusqlite, r2d2_sqlite)",
        home: "src/store/sqlite/",
        uses: |line| crate_path(line, "rusqlite") || crate_path(line, "r2d2_sqlite"),
    },
    Driver {
        what: "the MySQL driver (the mysql crate)",
        home: "src/store/mysql/",
        uses: |line| crate_path(line, "mysql"),
    },
    Driver {
        what: "the AMQP client (lapin)",
        home: "src/transport/",
        uses: |line| crate_path(line, "lapin"),
    },
];

/// Whether `line` names the crate `name`: `use name…`, `extern crate name`, or a path
/// `name::…` that is not itself inside another path (`store::mysql::…` is a module of ours).
fn crate_path(line: &str, name: &str) -> bool {
    let code = line.trim_start();
    for prefix in ["use ", "pub use ", "pub(crate) use ", "extern crate "] {
        if let Some(rest) = code.strip_prefix(prefix) {
            let rest = rest.strip_prefix("::").unwrap_or(rest);
            if rest.starts_with(name)
                && !rest[name.len()..].starts_with(|c: char| c.is_alphanumeric() || c == '_')
            {
                return true;
            }
        }
    }
    let bytes = line.as_bytes();
    let pattern = format!("{name}::");
    line.match_indices(&pattern).any(|(at, _)| {
        let before = &bytes[..at];
        let prev = before.last().copied();
        match prev {
            None => true,
            Some(b':') => {
                // `::name::` is the crate from the root only when nothing precedes the `::`.
                let lead = &before[..before.len() - 1];
                lead.last() == Some(&b':')
                    && !lead[..lead.len() - 1]
                        .last()
                        .is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'_')
            }
            Some(c) => !(c.is_ascii_alphanumeric() || c == b'_'),
        }
    })
}

/// A line that starts (or names) a thread other than through the one helper: a builder, a
/// bare `thread::spawn`, or an unnamed scoped thread (`scope.spawn(…)`; a scope's threads start
/// through `util::spawn_scoped`). Async tasks (`async_global_executor::spawn`) are not threads.
fn spawns_a_thread(line: &str) -> bool {
    line.contains("thread::Builder")
        || line.contains("thread::spawn")
        || line.contains("scope.spawn(")
        || line.trim_start().starts_with("s.spawn(")
}

/// Every `.rs` file under `dir`, as paths relative to `root` with `/` separators, sorted.
fn rust_files(root: &Path, dir: &str) -> Vec<String> {
    fn walk(root: &Path, at: &Path, out: &mut Vec<String>) {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(at)
            .unwrap_or_else(|e| panic!("reading {}: {e}", at.display()))
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for path in entries {
            if path.is_dir() {
                walk(root, &path, out);
            } else if path.extension().is_some_and(|x| x == "rs") {
                let rel = path.strip_prefix(root).unwrap();
                let parts: Vec<_> = rel.iter().map(|p| p.to_string_lossy()).collect();
                out.push(parts.join("/"));
            }
        }
    }
    let mut out = Vec::new();
    walk(root, &root.join(dir), &mut out);
    out
}

/// The code lines of `file` under `root`, numbered from 1, comment lines left out.
fn code_lines(root: &Path, file: &str) -> Vec<(usize, String)> {
    let text =
        std::fs::read_to_string(root.join(file)).unwrap_or_else(|e| panic!("reading {file}: {e}"));
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim_start().starts_with("//"))
        .map(|(i, l)| (i + 1, l.to_string()))
        .collect()
}

/// Every use of a driver outside its backend, as `file:line: what to do`.
fn drivers_outside_their_backends(root: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for file in rust_files(root, "src") {
        for (n, line) in code_lines(root, &file) {
            for d in DRIVERS {
                if !file.starts_with(d.home) && (d.uses)(&line) {
                    found.push(format!(
                        "{file}:{n}: {} is used outside {}: move this code into {} and call it through its interface ({})",
                        d.what,
                        d.home,
                        d.home,
                        line.trim()
                    ));
                }
            }
        }
    }
    found
}

/// The backticked `src/….rs` paths of ARCHITECTURE.md's code map.
fn code_map(root: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(root.join("ARCHITECTURE.md")).expect("ARCHITECTURE.md");
    let start = text
        .find("## Code map")
        .expect("ARCHITECTURE.md has a `## Code map` section");
    let section = &text[start + 2..];
    let section = &section[..section.find("\n## ").unwrap_or(section.len())];
    section
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|s| s.starts_with("src/") && s.ends_with(".rs"))
        .map(str::to_string)
        .collect()
}

/// Source files the code map does not name, and code map entries that name no file.
fn code_map_mismatches(root: &Path) -> Vec<String> {
    let named = code_map(root);
    let files = rust_files(root, "src");
    let mut found: Vec<String> = files
        .iter()
        .filter(|f| !named.contains(f))
        .map(|f| {
            format!(
                "{f}:1: not in ARCHITECTURE.md's code map: add a line \"- `{f}`: what it holds\" under `## Code map`"
            )
        })
        .collect();
    found.extend(named.iter().filter(|n| !files.contains(n)).map(|n| {
        format!("ARCHITECTURE.md: the code map names `{n}`, which does not exist: correct or remove its line")
    }));
    found
}

/// Threads started other than through `util::spawn`.
fn threads_outside_util_spawn(root: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for file in rust_files(root, "src") {
        if file == "src/util.rs" {
            continue;
        }
        // Unit tests (a module at the end of a file) may start bare threads.
        let lines = code_lines(root, &file);
        let tests_from = lines
            .iter()
            .find(|(_, l)| l.trim() == "#[cfg(test)]")
            .map_or(usize::MAX, |(n, _)| *n);
        for (n, line) in lines {
            if n < tests_from && spawns_a_thread(&line) {
                found.push(format!(
                    "{file}:{n}: a thread started directly: use `crate::util::spawn(name, f)`, which names it and turns a failure to start into an error ({})",
                    line.trim()
                ));
            }
        }
    }
    found
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn assert_none(rule: &str, found: Vec<String>) {
    assert!(
        found.is_empty(),
        "{rule}: {} place(s)\n{}",
        found.len(),
        found.join("\n")
    );
}

#[test]
fn each_driver_is_used_only_in_its_backend() {
    assert_none(
        "a driver outside its backend",
        drivers_outside_their_backends(root()),
    );
}

#[test]
fn every_source_file_is_in_the_code_map_and_every_entry_exists() {
    assert_none(
        "ARCHITECTURE.md's code map and src/ disagree",
        code_map_mismatches(root()),
    );
}

#[test]
fn every_thread_starts_through_util_spawn() {
    assert_none(
        "a thread not started through util::spawn",
        threads_outside_util_spawn(root()),
    );
}

#[test]
fn the_rules_catch_what_they_name_and_pass_what_they_allow() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let write = |path: &str, text: &str| {
        let p = root.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    };
    write(
        "ARCHITECTURE.md",
        "# A\n\n## Code map\n\n- `src/lib.rs`: modules.\n- `src/store/sqlite/mod.rs`: SQLite.\n- `src/gone.rs`: stale.\n\n## Invariants\n\n- `src/outbox.rs` is named here only.\n",
    );
    write(
        "src/lib.rs",
        "// use rusqlite::Connection; in a comment\nuse crate::store::mysql::Backend;\nfn f() { std::thread::scope(|s| { s.spawn(|| ()); }); }\n",
    );
    write("src/store/sqlite/mod.rs", "use rusqlite::Connection;\n");
    write(
        "src/outbox.rs",
        "use rusqlite::Connection;\nlet o = mysql::Opts::default();\nuse lapin;\nstd::thread::spawn(|| ());\nlet b = std::thread::Builder::new();\n",
    );
    write("src/util.rs", "std::thread::Builder::new().spawn(f)\n");

    let drivers = drivers_outside_their_backends(root);
    let at: Vec<&str> = drivers
        .iter()
        .map(|f| f.split(' ').next().unwrap())
        .collect();
    assert_eq!(
        at,
        ["src/outbox.rs:1:", "src/outbox.rs:2:", "src/outbox.rs:3:"],
        "{drivers:#?}"
    );
    assert!(drivers[0].contains("src/store/sqlite/"), "{}", drivers[0]);

    let map = code_map_mismatches(root);
    assert_eq!(map.len(), 3, "{map:#?}");
    assert!(map[0].starts_with("src/outbox.rs:1: not in"), "{map:#?}");
    assert!(map[1].starts_with("src/util.rs:1: not in"), "{map:#?}");
    assert!(
        map[2].contains("`src/gone.rs`, which does not exist"),
        "{map:#?}"
    );

    let threads = threads_outside_util_spawn(root);
    let at: Vec<&str> = threads
        .iter()
        .map(|f| f.split(' ').next().unwrap())
        .collect();
    assert_eq!(at, ["src/outbox.rs:4:", "src/outbox.rs:5:"], "{threads:#?}");
}

#[test]
fn a_crate_path_is_told_from_a_module_of_the_same_name() {
    assert!(crate_path("use mysql::prelude::Queryable;", "mysql"));
    assert!(crate_path("    let p = mysql::Pool::new(o)?;", "mysql"));
    assert!(crate_path("fn f(o: &::mysql::Opts) {}", "mysql"));
    assert!(crate_path("let c = (mysql::Conn::new(o));", "mysql"));
    assert!(!crate_path("use crate::store::mysql::Mysql;", "mysql"));
    assert!(!crate_path("use super::mysql::sql;", "mysql"));
    assert!(!crate_path("let n = my_mysql::x();", "mysql"));
    assert!(!crate_path("use mysql_common::Value;", "mysql"));
    assert!(crate_path("use lapin::{Channel, Connection};", "lapin"));
    assert!(!crate_path("let url = \"mysql://root@h/db\";", "mysql"));
}
