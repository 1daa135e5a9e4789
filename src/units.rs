//! Sizes and durations in the forms Kubernetes users write: `50Gi`, `512Mi`, `1G`, `30s`, `5m`,
//! `1h`, `forever`.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UnitError {
    #[error("{0:?} is not a size (examples: 50Gi, 512Mi, 1G, 4096)")]
    Size(String),
    #[error("{0:?} is not a duration (examples: 30s, 5m, 1h, 500ms, forever)")]
    Duration(String),
}

/// A byte count, parsed from a Kubernetes quantity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Size(pub u64);

impl FromStr for Size {
    type Err = UnitError;

    fn from_str(text: &str) -> Result<Self, UnitError> {
        let fail = || UnitError::Size(text.to_string());
        let trimmed = text.trim();
        let split = trimmed
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(trimmed.len());
        let (number, suffix) = trimmed.split_at(split);
        let multiplier: u64 = match suffix {
            "" => 1,
            "k" | "K" => 1000,
            "M" => 1000u64.pow(2),
            "G" => 1000u64.pow(3),
            "T" => 1000u64.pow(4),
            "P" => 1000u64.pow(5),
            "Ki" => 1 << 10,
            "Mi" => 1 << 20,
            "Gi" => 1 << 30,
            "Ti" => 1 << 40,
            "Pi" => 1 << 50,
            _ => return Err(fail()),
        };
        if number.is_empty() || number.starts_with('.') || number.matches('.').count() > 1 {
            return Err(fail());
        }
        let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
        let whole: u64 = whole.parse().map_err(|_| fail())?;
        let mut bytes = whole.checked_mul(multiplier).ok_or_else(fail)?;
        if !fraction.is_empty() {
            // Exact decimal arithmetic, rounded up to a whole byte as Kubernetes does.
            let digits = fraction.len().min(18) as u32;
            let numerator: u128 = fraction[..digits as usize].parse().map_err(|_| fail())?;
            let scale = 10u128.pow(digits);
            let extra = (numerator * u128::from(multiplier)).div_ceil(scale);
            bytes = bytes
                .checked_add(u64::try_from(extra).map_err(|_| fail())?)
                .ok_or_else(fail)?;
        }
        Ok(Size(bytes))
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(&str, u64); 5] = [
            ("Pi", 1 << 50),
            ("Ti", 1 << 40),
            ("Gi", 1 << 30),
            ("Mi", 1 << 20),
            ("Ki", 1 << 10),
        ];
        for (suffix, unit) in UNITS {
            if self.0 >= unit && self.0.is_multiple_of(unit) {
                return write!(f, "{}{suffix}", self.0 / unit);
            }
        }
        write!(f, "{}", self.0)
    }
}

/// Human-readable byte counts for logs and status output (`1.5 GiB`).
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// How long something may be trusted: a finite duration, or forever (immutable datasets).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ttl {
    Finite(Duration),
    Forever,
}

impl Ttl {
    /// True when something fetched `age` ago is still to be trusted.
    pub fn covers(self, age: Duration) -> bool {
        match self {
            Ttl::Finite(ttl) => age < ttl,
            Ttl::Forever => true,
        }
    }
}

impl FromStr for Ttl {
    type Err = UnitError;

    fn from_str(text: &str) -> Result<Self, UnitError> {
        match text.trim() {
            "forever" | "infinity" => Ok(Ttl::Forever),
            other => parse_duration(other).map(Ttl::Finite),
        }
    }
}

impl fmt::Display for Ttl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ttl::Forever => write!(f, "forever"),
            Ttl::Finite(d) => write!(f, "{}", format_duration(*d)),
        }
    }
}

/// Parses `30s`, `5m`, `1h30m`, `500ms`, `2d`; a bare number is seconds.
pub fn parse_duration(text: &str) -> Result<Duration, UnitError> {
    let fail = || UnitError::Duration(text.to_string());
    let text = text.trim();
    if text.is_empty() {
        return Err(fail());
    }
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    // Milliseconds, wide enough for every duration `format_duration` prints (whole
    // milliseconds up to u64::MAX seconds), so that what is printed parses again.
    let mut total: u128 = 0;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(fail)?;
        if digits == 0 {
            return Err(fail());
        }
        let value: u128 = rest[..digits].parse().map_err(|_| fail())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit_ms: u128 = match &rest[..unit_len] {
            "ms" => 1,
            "s" => 1000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(fail()),
        };
        let part = value.checked_mul(unit_ms).ok_or_else(fail)?;
        total = total.checked_add(part).ok_or_else(fail)?;
        rest = &rest[unit_len..];
    }
    let secs = u64::try_from(total / 1000).map_err(|_| fail())?;
    Ok(Duration::new(secs, (total % 1000) as u32 * 1_000_000))
}

pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if !ms.is_multiple_of(1000) {
        format!("{ms}ms")
    } else if ms.is_multiple_of(3_600_000) && ms > 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) && ms > 0 {
        format!("{}m", ms / 60_000)
    } else {
        format!("{}s", ms / 1000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        for (text, bytes) in [
            ("0", 0),
            ("4096", 4096),
            ("1k", 1000),
            ("1Ki", 1024),
            ("50Gi", 50 << 30),
            ("512Mi", 512 << 20),
            ("1G", 1_000_000_000),
            ("1.5Gi", 3 << 29),
            ("0.5Ki", 512),
            ("1Ti", 1 << 40),
        ] {
            assert_eq!(text.parse::<Size>(), Ok(Size(bytes)), "{text}");
        }
        for bad in [
            "",
            "Gi",
            "-1Gi",
            "1GB",
            "1.2.3Mi",
            ".5Mi",
            "1 Gi x",
            "99999999999999999999",
        ] {
            assert!(bad.parse::<Size>().is_err(), "{bad}");
        }
        assert_eq!(Size(50 << 30).to_string(), "50Gi");
        assert_eq!(Size(1000).to_string(), "1000");
    }

    /// Found by the `source_spec` fuzz target: a TTL given in seconds beyond 2^32 was printed
    /// as `...s` (or `h`, `m`) and that text did not parse (the units took 32-bit counts), so
    /// a `metadataTTL` CreateVolume accepted was refused by every node it reached.
    #[test]
    fn every_printed_duration_parses_back() {
        for text in [
            "2222222222251555",
            "18446744073709551615",
            "4294967296s",
            "4294967295d",
            "18446744073709551615s999ms",
            "307445734561825860m",
        ] {
            let ttl: Ttl = text.parse().unwrap();
            assert_eq!(
                ttl.to_string().parse::<Ttl>(),
                Ok(ttl),
                "{text} printed as {ttl}"
            );
        }
        assert!("18446744073709551615s1000ms".parse::<Ttl>().is_err());
    }

    #[test]
    fn durations() {
        for (text, secs) in [
            ("30s", 30),
            ("5m", 300),
            ("1h", 3600),
            ("1h30m", 5400),
            ("45", 45),
        ] {
            assert_eq!(
                text.parse::<Ttl>(),
                Ok(Ttl::Finite(Duration::from_secs(secs))),
                "{text}"
            );
        }
        assert_eq!(
            "500ms".parse::<Ttl>(),
            Ok(Ttl::Finite(Duration::from_millis(500)))
        );
        assert_eq!("forever".parse::<Ttl>(), Ok(Ttl::Forever));
        for bad in ["", "s", "5x", "-5s", "1.5h", "m5"] {
            assert!(bad.parse::<Ttl>().is_err(), "{bad}");
        }
        assert_eq!(Ttl::Finite(Duration::from_secs(60)).to_string(), "1m");
        assert!(
            "18446744073709551616s".parse::<Ttl>().is_err(),
            "beyond u64 seconds"
        );
        assert_eq!(Ttl::Forever.to_string(), "forever");
        assert!(Ttl::Forever.covers(Duration::MAX));
        assert!(!Ttl::Finite(Duration::from_secs(1)).covers(Duration::from_secs(1)));
    }
}
