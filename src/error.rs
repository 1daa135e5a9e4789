//! Errors printed with their causes.

use std::error::Error;
use std::fmt;

/// An error and every cause under it on one line (`what failed: why: why underneath`), for
/// logs and for messages that leave the process.
pub struct Chain<'a>(pub &'a (dyn Error + 'a));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(e) = cause {
            write!(f, ": {e}")?;
            cause = e.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("reading block 3 failed")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn every_cause_is_printed_in_order() {
        let e = Outer(std::io::Error::other("disk on fire"));
        assert_eq!(
            Chain(&e).to_string(),
            "reading block 3 failed: disk on fire"
        );
    }
}
