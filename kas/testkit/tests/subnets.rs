//! Subnet reservations never hand out the same subnet twice: not within a process, not to
//! two reservers, not to two processes.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::process::{Command, Stdio};

use kas_testkit::net::{ip, next_subnet, Subnet, SubnetReserver, CLAIM_HOST, CLAIM_PORT};

/// Set for the child process of [`a_child_process_never_gets_a_subnet_the_parent_holds`]:
/// where its reserver starts, and how many subnets it claims.
const CHILD_START: &str = "KAS_TESTKIT_CHILD_START";
const CHILD_COUNT: &str = "KAS_TESTKIT_CHILD_COUNT";

fn claimed(subnet: Subnet) -> bool {
    let claim = SocketAddr::new(ip(subnet, CLAIM_HOST), CLAIM_PORT);
    TcpListener::bind(claim).is_err()
}

#[test]
fn subnets_of_one_process_are_distinct_and_stay_claimed() {
    let subnets: Vec<Subnet> = (0..64).map(|_| next_subnet()).collect();
    let distinct: BTreeSet<_> = subnets.iter().collect();
    assert_eq!(distinct.len(), subnets.len(), "{subnets:?}");
    assert!(subnets.iter().all(|&s| claimed(s)), "{subnets:?}");
}

#[test]
fn two_reservers_scanning_from_the_same_start_never_share() {
    // Both scan the same subnets in the same order: only the claims keep them apart.
    let start = 1000 + std::process::id() as usize % 1000;
    let (mut a, mut b) = (
        SubnetReserver::starting_at(start),
        SubnetReserver::starting_at(start),
    );
    for _ in 0..20 {
        a.reserve();
        b.reserve();
    }
    let (a_held, b_held): (BTreeSet<_>, BTreeSet<_>) = (
        a.held().into_iter().collect(),
        b.held().into_iter().collect(),
    );
    assert_eq!((a_held.len(), b_held.len()), (20, 20));
    assert!(a_held.is_disjoint(&b_held), "{a_held:?} {b_held:?}");
    // Dropping a reserver gives its subnets back.
    drop(a);
    assert!(a_held.iter().all(|&s| !claimed(s)), "{a_held:?}");
    assert!(b_held.iter().all(|&s| claimed(s)), "{b_held:?}");
}

#[test]
fn a_child_process_never_gets_a_subnet_the_parent_holds() {
    let start = 3000 + std::process::id() as usize % 1000;
    let mut parent = SubnetReserver::starting_at(start);
    for _ in 0..10 {
        parent.reserve();
    }
    // The child scans from the same start while the parent goes on claiming.
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_reserves_and_holds", "--nocapture"])
        .args(["--test-threads", "1"])
        .env(CHILD_START, start.to_string())
        .env(CHILD_COUNT, "10")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    for _ in 0..10 {
        parent.reserve();
    }
    let mut child_held = BTreeSet::new();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    for line in lines.by_ref() {
        // The test harness writes its own words before the first line of ours.
        let line = line.unwrap();
        if line.ends_with("holding") {
            break;
        }
        if let Some((_, rest)) = line.split_once("claimed ") {
            let (a, b) = rest.split_once('.').unwrap();
            child_held.insert((a.parse::<u8>().unwrap(), b.parse::<u8>().unwrap()));
        }
    }
    let parent_held: BTreeSet<_> = parent.held().into_iter().collect();
    assert_eq!((parent_held.len(), child_held.len()), (20, 10));
    assert!(
        parent_held.is_disjoint(&child_held),
        "{parent_held:?} {child_held:?}"
    );
    assert!(child_held.iter().all(|&s| claimed(s)), "{child_held:?}");
    // The claims end with the child.
    drop(child.stdin.take());
    lines.for_each(drop);
    assert!(child.wait().unwrap().success());
    assert!(child_held.iter().all(|&s| !claimed(s)), "{child_held:?}");
}

/// The child of [`a_child_process_never_gets_a_subnet_the_parent_holds`]; does nothing in
/// a normal run.
#[test]
fn child_reserves_and_holds() {
    let (Ok(start), Ok(count)) = (std::env::var(CHILD_START), std::env::var(CHILD_COUNT)) else {
        return;
    };
    let mut reserver = SubnetReserver::starting_at(start.parse().unwrap());
    for _ in 0..count.parse::<usize>().unwrap() {
        let (a, b) = reserver.reserve();
        println!("claimed {a}.{b}");
    }
    println!("holding");
    // Until the parent closes our stdin.
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut std::io::stdin(), &mut rest);
}
