//! docker-compose.yml must run the binaries as they really are: every flag
//! it passes and every KEYCAP_* variable it sets is one the binary's
//! `--help` names, every flag the binary requires is given, and the fleet
//! it describes is the one the README promises (two control-plane
//! replicas, three proxies, PostgreSQL, a balancer the proxies trust).
//!
//! Build the binaries first: `cargo build --workspace --bins`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use keycap_tests::harness::bin_path;

fn repo_file(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn help(bin: &str) -> String {
    let out = Command::new(bin_path(bin))
        .arg("--help")
        .env_clear()
        .output()
        .unwrap_or_else(|e| panic!("cannot run {bin} --help (build the binaries first): {e}"));
    assert!(out.status.success(), "{bin} --help failed");
    String::from_utf8(out.stdout).expect("UTF-8 help")
}

/// The long flags `help` lists, with the environment variable of each.
/// An option's entry starts with a line beginning `-` and runs to the next.
fn flags(help: &str) -> BTreeMap<String, Option<String>> {
    let mut out = BTreeMap::new();
    let mut entry: Option<(String, String)> = None;
    for line in help.lines() {
        let starts_entry = line.trim_start().starts_with('-');
        if starts_entry {
            out.extend(entry.take().map(|(flag, text)| (flag, env_of(&text))));
            if let Some(flag) = line.split_whitespace().find(|w| w.starts_with("--")) {
                entry = Some((flag.trim_end_matches(',').to_string(), String::new()));
            }
        }
        if let Some((_, text)) = &mut entry {
            text.push_str(line);
            text.push('\n');
        }
    }
    out.extend(entry.map(|(flag, text)| (flag, env_of(&text))));
    out
}

/// `NAME` from an entry's `[env: NAME=...]` (or `[env: NAME]` for hidden
/// values).
fn env_of(entry: &str) -> Option<String> {
    let rest = entry.split("[env: ").nth(1)?;
    Some(rest.split(['=', ']']).next()?.to_string())
}

/// The flags `Usage:` says must be given.
fn required(help: &str) -> Vec<String> {
    let usage = help
        .lines()
        .find(|l| l.starts_with("Usage:"))
        .expect("a Usage line");
    usage
        .split_whitespace()
        .filter(|w| w.starts_with("--"))
        .map(str::to_string)
        .collect()
}

/// One service's command and environment, as the compose file gives them.
#[derive(Debug, Default)]
struct Service {
    command: Vec<String>,
    env: BTreeSet<String>,
}

/// Reads the compose file's services. Commands are one-line flow
/// sequences (JSON arrays); environments come from the `x-*-env` anchors a
/// service names with `environment: *name`.
fn services(compose: &str) -> BTreeMap<String, Service> {
    let mut anchors: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut anchor: Option<String> = None;
    let mut in_services = false;
    let mut current: Option<String> = None;
    let mut out: BTreeMap<String, Service> = BTreeMap::new();
    for line in compose.lines() {
        if !line.starts_with(' ') && !line.trim().is_empty() {
            in_services = line == "services:";
            anchor = line
                .split_once(": &")
                .map(|(_, name)| name.trim().to_string())
                .filter(|name| name.ends_with("-env"));
            current = None;
            continue;
        }
        let trimmed = line.trim();
        if let Some(a) = &anchor {
            if let Some((name, _)) = trimmed.split_once(':') {
                anchors
                    .entry(a.clone())
                    .or_default()
                    .insert(name.to_string());
            }
            continue;
        }
        if !in_services {
            continue;
        }
        if line.starts_with("  ") && !line.starts_with("   ") && trimmed.ends_with(':') {
            let name = trimmed.trim_end_matches(':').to_string();
            out.insert(name.clone(), Service::default());
            current = Some(name);
            continue;
        }
        let Some(svc) = current.as_ref().and_then(|c| out.get_mut(c)) else {
            continue;
        };
        if let Some(cmd) = trimmed.strip_prefix("command: ") {
            svc.command = serde_json::from_str(cmd)
                .unwrap_or_else(|e| panic!("command is not a one-line sequence ({e}): {cmd}"));
        } else if let Some(name) = trimmed.strip_prefix("environment: *") {
            svc.env = anchors
                .get(name)
                .unwrap_or_else(|| panic!("no anchor {name}"))
                .clone();
        }
    }
    out
}

#[test]
fn the_compose_file_runs_the_binaries_as_they_are() {
    let compose = repo_file("docker-compose.yml");
    let services = services(&compose);
    let mut seen = BTreeMap::<&str, usize>::new();
    for (name, svc) in &services {
        let Some(bin) = svc.command.first() else {
            continue;
        };
        assert!(
            bin == "keycap-control" || bin == "keycap-proxy",
            "{name} runs {bin}"
        );
        *seen.entry(bin.as_str()).or_default() += 1;
        let help = help(bin);
        let known = flags(&help);
        let given: Vec<&String> = svc.command.iter().filter(|a| a.starts_with("--")).collect();
        for flag in &given {
            assert!(
                known.contains_key(flag.as_str()),
                "{name}: {bin} has no flag {flag}; it has {:?}",
                known.keys()
            );
        }
        let envs: BTreeSet<&str> = known.values().flatten().map(String::as_str).collect();
        for var in &svc.env {
            assert!(
                envs.contains(var.as_str()),
                "{name}: {bin} reads no {var}; it reads {envs:?}"
            );
        }
        for flag in required(&help) {
            let by_env = known[&flag]
                .as_ref()
                .is_some_and(|env| svc.env.contains(env));
            assert!(
                given.iter().any(|g| **g == flag) || by_env,
                "{name}: {bin} requires {flag}, and the compose file gives it neither as a flag nor through its variable"
            );
        }
    }
    assert_eq!(
        seen.get("keycap-control"),
        Some(&2),
        "two control-plane replicas"
    );
    assert_eq!(seen.get("keycap-proxy"), Some(&3), "three proxies");
    assert!(services.contains_key("postgres"), "PostgreSQL");

    // The balancer spreads over exactly the proxies, and the proxies trust
    // exactly the balancer's address for X-Forwarded-For.
    let nginx = repo_file("deploy/nginx.conf");
    let upstreams: BTreeSet<String> = nginx
        .lines()
        .filter_map(|l| l.trim().strip_prefix("server ")?.strip_suffix(';'))
        .filter_map(|s| s.split(':').next())
        .map(str::to_string)
        .collect();
    let proxies: BTreeSet<String> = services
        .iter()
        .filter(|(_, s)| s.command.first().is_some_and(|b| b == "keycap-proxy"))
        .map(|(n, _)| n.clone())
        .collect();
    assert_eq!(upstreams, proxies);
    let balancer_ip = compose
        .lines()
        .find_map(|l| l.trim().strip_prefix("ipv4_address: "))
        .expect("the balancer's fixed address");
    // Every proxy names every replica, so it can move to another when
    // one dies, and the proxies do not all start on the same one.
    let replicas: BTreeSet<String> = services
        .iter()
        .filter(|(_, s)| s.command.first().is_some_and(|b| b == "keycap-control"))
        .map(|(n, _)| n.clone())
        .collect();
    let mut first_choices = BTreeSet::new();
    for (name, svc) in services.iter().filter(|(n, _)| proxies.contains(*n)) {
        let urls: Vec<&String> = svc
            .command
            .windows(2)
            .filter(|w| w[0] == "--control-url")
            .map(|w| &w[1])
            .collect();
        let named: BTreeSet<String> = urls
            .iter()
            .filter_map(|u| u.strip_prefix("http://")?.split(':').next())
            .map(str::to_string)
            .collect();
        assert_eq!(named, replicas, "{name} names {urls:?}");
        first_choices.insert(urls.first().map(|u| u.to_string()));
    }
    assert!(
        first_choices.len() > 1,
        "every proxy starts on the same replica"
    );
    for (name, svc) in services.iter().filter(|(n, _)| proxies.contains(*n)) {
        let trusted = svc
            .command
            .iter()
            .skip_while(|a| *a != "--trusted-proxies")
            .nth(1)
            .unwrap_or_else(|| panic!("{name} trusts no balancer"));
        assert_eq!(trusted, &format!("{balancer_ip}/32"), "{name}");
    }
}

#[test]
fn the_flag_reader_sees_flags_variables_and_requirements() {
    let help = "Usage: x [OPTIONS] --need <NEED>\n\nOptions:\n      --need <NEED>\n          Needed [env: X_NEED=]\n      --secret <S>\n          Hidden [env: X_SECRET]\n  -h, --help\n          Print help\n";
    let f = flags(help);
    assert_eq!(f["--need"].as_deref(), Some("X_NEED"));
    assert_eq!(f["--secret"].as_deref(), Some("X_SECRET"));
    assert_eq!(f["--help"], None);
    assert_eq!(required(help), ["--need"]);
    let compose = "x-a-env: &a-env\n  X_NEED: 1\n\nservices:\n  one:\n    command: [\"x\", \"--secret\", \"s\"]\n    environment: *a-env\n  two:\n    image: y\n";
    let s = services(compose);
    assert_eq!(s["one"].command, ["x", "--secret", "s"]);
    assert!(s["one"].env.contains("X_NEED"));
    assert!(s["two"].command.is_empty());
}
