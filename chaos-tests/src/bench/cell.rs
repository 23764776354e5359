//! A cell of the bench grid: one scale point, front-ends × VIPs, measured on a lab of its
//! own, and the lab settings that follow from its size.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::Serialize;

use crate::lab::topology::{MAX_FRONT_ENDS, MAX_VIPS};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(into = "String")]
pub struct Cell {
    pub front_ends: usize,
    pub vips: usize,
}

/// Probe connections per second the whole lab makes at most: 20 front-ends at 50 ms each,
/// what the storm lab showed the 2-core machine carrying through userspace ESP on one
/// back-end beside the storm itself.
pub const PROBE_BUDGET_PER_SECOND: u32 = 400;
/// The lab's usual probe interval, kept wherever the budget allows it.
pub const FASTEST_PROBE: Duration = Duration::from_millis(20);
/// Above this many SAs on the new owner its charon answers a front-end later than the small
/// lab's 500 ms initiate timeout, and abandoned attempts that still complete there are a
/// storm of their own (docs/bench/storm.md).
pub const SMALL_CELL_SAS: usize = 20;

impl Cell {
    pub fn new(front_ends: usize, vips: usize) -> Cell {
        Cell { front_ends, vips }
    }

    /// `20x3`.
    pub fn name(self) -> String {
        format!("{}x{}", self.front_ends, self.vips)
    }

    /// SAs the VIPs' owner holds: one per front-end and VIP.
    pub fn sas(self) -> usize {
        self.front_ends * self.vips
    }

    /// How often each front-end probes each VIP: the lab's 20 ms where the whole lab stays
    /// within [`PROBE_BUDGET_PER_SECOND`], slower in big cells. It is the resolution of the
    /// recovery times measured there.
    pub fn probe_interval(self) -> Duration {
        let budget = Duration::from_secs(1) / PROBE_BUDGET_PER_SECOND;
        (budget * self.sas() as u32).max(FASTEST_PROBE)
    }

    /// `keying.initiate_timeout` of the agents: 500 ms in small cells, 2 s above
    /// [`SMALL_CELL_SAS`] (as the storm lab).
    pub fn initiate_timeout(self) -> Duration {
        if self.sas() > SMALL_CELL_SAS {
            Duration::from_secs(2)
        } else {
            Duration::from_millis(500)
        }
    }

    /// How long a freshly built or reset lab may take to carry steady traffic: the lab's
    /// 30 s, and more where every SA is negotiated at once at start-up.
    pub fn settle_timeout(self) -> Duration {
        Duration::from_secs(30) + Duration::from_millis(100) * self.sas() as u32
    }
}

impl fmt::Display for Cell {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

impl From<Cell> for String {
    fn from(c: Cell) -> String {
        c.name()
    }
}

impl FromStr for Cell {
    type Err = String;
    fn from_str(s: &str) -> Result<Cell, String> {
        let (fe, vips) = s
            .trim()
            .split_once(['x', 'X', '×'])
            .ok_or_else(|| format!("cell {s:?}: write FRONT_ENDSxVIPS, e.g. 20x3"))?;
        let num = |what: &str, v: &str, max: usize| -> Result<usize, String> {
            let n: usize = v
                .trim()
                .parse()
                .map_err(|_| format!("cell {s:?}: {what} {v:?} is not a number"))?;
            if (1..=max).contains(&n) {
                Ok(n)
            } else {
                Err(format!("cell {s:?}: {what} must be 1 to {max}"))
            }
        };
        Ok(Cell {
            front_ends: num("front-ends", fe, MAX_FRONT_ENDS)?,
            vips: num("VIPs", vips, MAX_VIPS)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_parse_and_name_themselves() {
        let c: Cell = "20x3".parse().unwrap();
        assert_eq!(c, Cell::new(20, 3));
        assert_eq!(c.name(), "20x3");
        assert_eq!(" 1X100 ".parse::<Cell>().unwrap(), Cell::new(1, 100));
        assert_eq!("2×2".parse::<Cell>().unwrap(), Cell::new(2, 2));
        for bad in ["20", "x3", "0x1", "1x0", "60x1", "1x101", "ax1", "1x1x1"] {
            assert!(bad.parse::<Cell>().is_err(), "{bad}");
        }
    }

    #[test]
    fn big_cells_probe_slower_and_wait_longer() {
        let ms = Duration::from_millis;
        assert_eq!(Cell::new(1, 1).probe_interval(), ms(20));
        assert_eq!(Cell::new(2, 2).probe_interval(), ms(20));
        assert_eq!(Cell::new(1, 10).probe_interval(), ms(25));
        assert_eq!(Cell::new(20, 1).probe_interval(), ms(50));
        assert_eq!(Cell::new(20, 3).probe_interval(), ms(150));
        assert_eq!(Cell::new(1, 100).probe_interval(), ms(250));
        assert_eq!(Cell::new(20, 1).initiate_timeout(), ms(500));
        assert_eq!(Cell::new(20, 3).initiate_timeout(), ms(2000));
        assert_eq!(Cell::new(1, 1).settle_timeout(), ms(30_100));
    }
}
