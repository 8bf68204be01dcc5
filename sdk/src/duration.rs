//! Durations as operators write them in `ANGEL_*` variables: the same forms as angel-host's
//! flags (`500ms`, `30s`, `2m`, `1h`, or a bare number of seconds).

use std::time::Duration;

/// The longest duration accepted (as for the host's flags): anything longer is a typo.
const MAX: Duration = Duration::from_secs(7 * 24 * 3600);

/// Parses `500ms`, `30s`, `2m`, `1h` or a bare number of seconds (whole numbers only).
pub(crate) fn parse(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(digits);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 500ms, 30s, 2m)"))?;
    let d = match unit.trim() {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        other => {
            return Err(format!(
                "{s:?} has an unknown unit {other:?} (use ms, s, m or h)"
            ))
        }
    };
    if d > MAX {
        return Err(format!("{s:?} is longer than 7 days"));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_forms_of_the_host_flags() {
        assert_eq!(parse("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse(" 2m "), Ok(Duration::from_secs(120)));
        assert_eq!(parse("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse("45"), Ok(Duration::from_secs(45)));
        assert_eq!(parse("0"), Ok(Duration::ZERO));
    }

    #[test]
    fn refuses_what_is_not_a_duration() {
        for bad in [
            "",
            "s",
            "abc",
            "1.5s",
            "-1s",
            "10 parsecs",
            "3d",
            "99999999h",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
