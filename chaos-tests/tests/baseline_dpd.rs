//! The strongSwan DPD baseline (DPD 1 s, restart actions, short retransmissions,
//! `mobike = no`): recovers from a planned move and from a crash in a few seconds, with no
//! clear text. This also checks the harness: the DESIGN lab measured ~3 s for both.

mod common;

use std::time::Duration;

use vipsec_chaos::lab::Setup;
use vipsec_chaos::lab::faults::Fault;

const CAP: Duration = Duration::from_secs(30);

#[test]
fn planned_move_recovers_through_dpd() {
    let _t = common::start("strongswan-dpd planned move");
    let mut lab = common::lab(Setup::StrongswanDpd);
    let o = common::run(&mut lab, Fault::Planned, CAP);
    common::assert_safe(&o);
    common::assert_recovered(&o, CAP);
}

#[test]
fn crash_recovers_through_dpd() {
    let _t = common::start("strongswan-dpd crash");
    let mut lab = common::lab(Setup::StrongswanDpd);
    let o = common::run(&mut lab, Fault::Crash, CAP);
    common::assert_safe(&o);
    common::assert_recovered(&o, CAP);
}
