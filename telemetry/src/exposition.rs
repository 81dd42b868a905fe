//! The metrics exposition both planes serve: OpenMetrics text to a scraper
//! that asks for it (Prometheus does), else the classic Prometheus text
//! format, which older tools (`promtool check metrics`) read.

/// OpenMetrics' content type.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The classic text format's content type.
const CLASSIC: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The content type and body for a scraper that sent `accept`, from the
/// OpenMetrics text `openmetrics`.
pub fn negotiate(openmetrics: String, accept: Option<&str>) -> (&'static str, String) {
    if accept.is_some_and(|a| a.contains("application/openmetrics-text")) {
        (OPENMETRICS, openmetrics)
    } else {
        (CLASSIC, classic(&openmetrics))
    }
}

/// The classic format of an OpenMetrics text: a counter family is named
/// by its `_total` sample in `# HELP` and `# TYPE`, and there is no
/// `# EOF` (other `#` lines, such as `# UNIT`, are comments there).
fn classic(openmetrics: &str) -> String {
    let counters: Vec<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|tag| {
            let rest = line.strip_prefix(tag)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(&name)
                .then(|| format!("{tag}{name}_total {tail}"))
        });
        match renamed {
            Some(l) => out.push_str(&l),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP a_requests Calls.\n# TYPE a_requests counter\na_requests_total{x=\"y\"} 2\n# HELP a_version Version.\n# TYPE a_version gauge\na_version 3\n# EOF\n";

    #[test]
    fn openmetrics_is_served_to_who_asks_and_the_classic_format_to_the_rest() {
        let (ct, body) = negotiate(
            TEXT.into(),
            Some("application/openmetrics-text;version=1.0.0,text/plain;q=0.5"),
        );
        assert!(ct.starts_with("application/openmetrics-text"));
        assert_eq!(body, TEXT);
        let (ct, body) = negotiate(TEXT.into(), None);
        assert!(ct.starts_with("text/plain; version=0.0.4"));
        assert_eq!(
            body,
            "# HELP a_requests_total Calls.\n# TYPE a_requests_total counter\na_requests_total{x=\"y\"} 2\n# HELP a_version Version.\n# TYPE a_version gauge\na_version 3\n"
        );
    }
}
