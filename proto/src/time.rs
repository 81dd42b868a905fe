//! Conversions between protobuf timestamps and `chrono` UTC times.

use chrono::{DateTime, TimeZone, Utc};

pub fn to_proto(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

pub fn opt_to_proto(t: Option<DateTime<Utc>>) -> Option<prost_types::Timestamp> {
    t.map(to_proto)
}

/// `None` for a missing or out-of-range timestamp.
pub fn from_proto(t: &prost_types::Timestamp) -> Option<DateTime<Utc>> {
    if !(0..1_000_000_000).contains(&t.nanos) {
        return None;
    }
    Utc.timestamp_opt(t.seconds, t.nanos as u32).single()
}

/// The UTC day a time falls in, as the budget window name `YYYY-MM-DD`.
pub fn utc_day(t: DateTime<Utc>) -> String {
    use chrono::Datelike;
    // Formatted by hand: on the request path, strftime's pattern parsing
    // costs more than the rest of this function.
    let d = t.date_naive();
    format!("{:04}-{:02}-{:02}", d.year(), d.month(), d.day())
}

/// The start of the UTC day after `t`: when a daily cap resets.
pub fn next_utc_midnight(t: DateTime<Utc>) -> DateTime<Utc> {
    let d = t.date_naive().succ_opt().unwrap_or(t.date_naive());
    Utc.from_utc_datetime(&d.and_hms_opt(0, 0, 0).expect("midnight exists"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn day_and_reset() {
        let t = Utc.with_ymd_and_hms(2026, 11, 22, 23, 59, 59).unwrap();
        assert_eq!(utc_day(t), "2026-11-22");
        assert_eq!(
            utc_day(Utc.with_ymd_and_hms(987, 1, 2, 0, 0, 0).unwrap()),
            "0987-01-02"
        );
        assert_eq!(
            next_utc_midnight(t),
            Utc.with_ymd_and_hms(2026, 11, 23, 0, 0, 0).unwrap()
        );
        let p = to_proto(t);
        assert_eq!(from_proto(&p), Some(t));
        assert_eq!(
            from_proto(&prost_types::Timestamp {
                seconds: 0,
                nanos: -1
            }),
            None
        );
    }
}
