//! Bounded whatever the peer does: credentials that no output or command line shows, connect
//! attempts that cannot pile up, request heads scanned to the last pipelined one.

use std::process::Stdio;
use std::time::Duration;

use big_market::util::wait_until;

use crate::cli::bin;
use crate::support::*;

const SECRET: &str = "s3cretpw77";

const AWARD: &[&str] = &[
    "award",
    "--user-id",
    "u1",
    "--activity-id",
    "1",
    "--strategy-id",
    "1",
    "--order-id",
    "000000000001",
    "--award-id",
    "1",
    "--award-title",
    "t",
    "--wait-timeout",
    "1s",
];

fn output_of(cmd: &mut std::process::Command) -> (Option<i32>, String) {
    let out = cmd.env("RUST_LOG", "debug").output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

#[test]
fn an_unparsable_amqp_or_mysql_url_is_refused_without_showing_its_password() {
    let dir = tempfile::tempdir().unwrap();
    for url in [
        format!("amqq//guest:{SECRET}@127.0.0.1:5672/%2f"),
        format!("amqp:/guest:{SECRET}@127.0.0.1"),
        format!("amqp://guest:{SECRET}@127.0.0.1:99999/%2f"),
        format!("amqp://guest:{SECRET}@127.0.0.1/%2f?heartbeat=x{SECRET}"),
        format!("amqp://guest:{SECRET}%ff@127.0.0.1/%2f"),
    ] {
        let (code, text) = output_of(bin(dir.path()).args(["--amqp-url", &url]).args(AWARD));
        assert_eq!(code, Some(2), "{url}: {text}");
        assert!(text.contains("AMQP URL"), "{url}: {text}");
        assert!(!text.contains(SECRET), "{url}: {text}");
    }
    for url in [
        format!("mysql://u:{SECRET}@127.0.0.1:99999/db"),
        format!("mysql//u:{SECRET}@127.0.0.1/db"),
        format!("mysql://u:{SECRET}@127.0.0.1/db?nonsense={SECRET}"),
        format!("mysql://u:{SECRET}@127.0.0.1"),
    ] {
        let (code, text) = output_of(bin(dir.path()).args(["--store", &url, "status"]));
        assert_eq!(code, Some(2), "{url}: {text}");
        assert!(text.contains("--store"), "{url}: {text}");
        assert!(!text.contains(SECRET), "{url}: {text}");
    }
}

/// Spawn `cmd`, wait for its first child process, and return that child's command line and
/// environment; every process involved is killed before this returns.
pub fn first_child_of(cmd: &mut std::process::Command) -> (String, String) {
    let mut parent = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = parent.id();
    let mut seen = None;
    wait_until(Duration::from_secs(60), || {
        seen = children_of(pid).into_iter().find_map(|c| {
            let line = cmdline(c);
            (!line.is_empty()).then(|| {
                let env = std::fs::read(format!("/proc/{c}/environ"))
                    .map(|b| String::from_utf8_lossy(&b).replace('\0', "\n"))
                    .unwrap_or_default();
                (line, env)
            })
        });
        seen.is_some()
    });
    for c in children_of(pid) {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &c.to_string()])
            .status();
    }
    let _ = parent.kill();
    let _ = parent.wait();
    seen.expect("verify started no child process within 60s")
}

#[test]
fn verify_hands_the_amqp_url_to_its_children_through_the_environment_not_their_command_line() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens on port 9: the children start disconnected, and live long enough to read.
    let url = format!("amqp://guest:{SECRET}@127.0.0.1:9/%2f");
    let (line, env) = first_child_of(bin(dir.path()).env("AMQP_URL", &url).args([
        "verify",
        "--rounds",
        "1",
        "--records",
        "20",
    ]));
    assert!(line.contains(" load ") || line.contains(" init"), "{line}");
    assert!(
        !line.contains(SECRET),
        "a child's command line shows the password: {line}"
    );
    assert!(
        env.lines().any(|l| l == format!("AMQP_URL={url}")),
        "the child got the URL through its environment"
    );
}
