//! Figures shown with a fixed number of decimals (`2.50 s`, `1.5 KiB`, `37%`), computed from
//! integers: an exact ratio rounded to the nearest, ties to even, as `{:.N}` rounds a float. No
//! float is formatted anywhere in ferryd, so `core`'s float formatting (about 11 KiB of code and
//! tables) stays out of the binary.

use std::fmt;
use std::time::Duration;

/// Nanoseconds in a second.
const NANOS: u128 = 1_000_000_000;

/// A non-negative number with `places` decimals, shown as `int.frac`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fixed {
    /// The value times 10^places, rounded (at most `u64::MAX`: every figure ferryd shows fits,
    /// and 64-bit arithmetic is much smaller than 128-bit on 32-bit boards).
    scaled: u64,
    places: u32,
}

impl Fixed {
    /// `num / den` with `places` decimals (at most 9); zero when `den` is zero. Out of line:
    /// 128-bit division is large code on 32-bit targets.
    #[inline(never)]
    pub fn ratio(num: u128, den: u128, places: u32) -> Fixed {
        let scale = 10u128.pow(places);
        if den == 0 {
            return Fixed { scaled: 0, places };
        }
        let (q, r) = (num * scale / den, num * scale % den);
        // Round half to even, exactly: r/den against one half.
        let up = match (2 * r).cmp(&den) {
            std::cmp::Ordering::Greater => true,
            std::cmp::Ordering::Equal => q % 2 == 1,
            std::cmp::Ordering::Less => false,
        };
        Fixed {
            scaled: u64::try_from(q + u128::from(up)).unwrap_or(u64::MAX),
            places,
        }
    }

    /// A time in seconds with `places` decimals.
    pub fn secs(d: Duration, places: u32) -> Fixed {
        Fixed::ratio(d.as_nanos(), NANOS, places)
    }

    /// Bytes per second over `took`, in MB (10^6 bytes) per second with one decimal; a time
    /// under a microsecond counts as one.
    pub fn mb_per_s(bytes: u64, took: Duration) -> Fixed {
        Fixed::ratio(u128::from(bytes) * 1000, took.as_nanos().max(1000), 1)
    }

    /// `part` of `whole` in percent, no decimals; 100 when `whole` is zero.
    pub fn percent(part: u64, whole: u64) -> Fixed {
        if whole == 0 {
            return Fixed::ratio(100, 1, 0);
        }
        Fixed::ratio(u128::from(part) * 100, u128::from(whole), 0)
    }
}

impl fmt::Display for Fixed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scale = 10u64.pow(self.places);
        let int = self.scaled / scale;
        if self.places == 0 {
            return write!(f, "{int}");
        }
        let frac = self.scaled % scale;
        write!(f, "{int}.{frac:0width$}", width = self.places as usize)
    }
}

/// A time in seconds as the shortest decimal that reads back the same (`5`, `2.5`, `0.001`),
/// as `{}` shows an `f64` of whole nanoseconds.
pub struct Secs(pub Duration);

impl fmt::Display for Secs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (secs, mut nanos, mut width) = (self.0.as_secs(), self.0.subsec_nanos(), 9);
        if nanos == 0 {
            return write!(f, "{secs}");
        }
        while nanos % 10 == 0 {
            nanos /= 10;
            width -= 1;
        }
        write!(f, "{secs}.{nanos:0width$}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_round_like_float_formatting() {
        // (num, den, places, what `{:.places$}` shows for num / den as an f64)
        let cases: [(u128, u128, u32, &str); 12] = [
            (0, 1, 1, "0.0"),
            (1, 4, 1, "0.2"),
            (3, 4, 1, "0.8"),
            (5, 2, 0, "2"),
            (7, 2, 0, "4"),
            (1, 3, 3, "0.333"),
            (2, 3, 2, "0.67"),
            (1536, 1024, 1, "1.5"),
            (1280, 1024, 1, "1.2"),
            (1, 1, 0, "1"),
            (1 << 60, 1, 0, "1152921504606846976"),
            (5 * 1024u128.pow(5), 1024u128.pow(4), 2, "5120.00"),
        ];
        for (num, den, places, want) in cases {
            assert_eq!(
                Fixed::ratio(num, den, places).to_string(),
                want,
                "{num}/{den}"
            );
            let float = format!("{:.*}", places as usize, num as f64 / den as f64);
            assert_eq!(float, want, "{num}/{den} as a float");
        }
        assert_eq!(Fixed::ratio(1, 0, 2).to_string(), "0.00");
    }

    #[test]
    fn seconds_rates_and_percentages() {
        for (d, places, want) in [
            (Duration::ZERO, 1, "0.0"),
            (Duration::from_millis(2500), 3, "2.500"),
            (Duration::from_millis(1_234), 2, "1.23"),
            (Duration::from_millis(59_960), 1, "60.0"),
            (Duration::from_secs(75), 1, "75.0"),
        ] {
            assert_eq!(Fixed::secs(d, places).to_string(), want, "{d:?}");
        }
        assert_eq!(
            Fixed::mb_per_s(3_000_000, Duration::from_secs(2)).to_string(),
            "1.5"
        );
        assert_eq!(Fixed::mb_per_s(5, Duration::ZERO).to_string(), "5.0");
        assert_eq!(Fixed::percent(1, 3).to_string(), "33");
        assert_eq!(Fixed::percent(0, 0).to_string(), "100");
    }

    #[test]
    fn shortest_seconds() {
        for (d, want) in [
            (Duration::from_secs(5), "5"),
            (Duration::from_millis(2500), "2.5"),
            (Duration::from_millis(1), "0.001"),
            (Duration::from_nanos(1_000_000_007), "1.000000007"),
            (Duration::ZERO, "0"),
        ] {
            assert_eq!(Secs(d).to_string(), want);
            assert_eq!(d.as_secs_f64().to_string(), want, "as a float");
        }
    }
}
