//! strongSwan as shipped (no DPD): after the VIP moves, the front-ends keep sending into
//! SAs with a node that no longer owns it and never recover on their own. These tests pin
//! that down (it is the gap vipsec closes) with a short cap, and check that the trap policy
//! keeps the protected ports from leaking in clear text meanwhile.

mod common;

use std::time::Duration;

use vipsec_chaos::lab::Setup;
use vipsec_chaos::lab::faults::Fault;

const CAP: Duration = Duration::from_secs(15);

#[test]
fn planned_move_never_recovers_without_dpd() {
    let _t = common::start("strongswan-defaults planned move");
    let mut lab = common::lab(Setup::StrongswanDefaults);
    let o = common::run(&mut lab, Fault::Planned, CAP);
    common::assert_safe(&o);
    assert_eq!(o.recovery, None, "{}", o.summary());
}

#[test]
fn crash_never_recovers_without_dpd() {
    let _t = common::start("strongswan-defaults crash");
    let mut lab = common::lab(Setup::StrongswanDefaults);
    let o = common::run(&mut lab, Fault::Crash, CAP);
    common::assert_safe(&o);
    assert_eq!(o.recovery, None, "{}", o.summary());
}
