//! Loopback addresses for tests. Each fixture gets a 127.A.B.0/24 of its own, so pods, the
//! edge and clients can have fixed ports on addresses of their own (like pod IPs) without
//! meeting another test's.
//!
//! A subnet is reserved for real, across processes: a test process claims 127.A.B.0/24 by
//! listening on 127.A.B.254:[`CLAIM_PORT`] and holds that listener until it exits. A claim
//! that fails to bind means another process (or another reserver in this one) holds the
//! subnet, and the next one is tried. Concurrent test binaries therefore never share a
//! subnet, whatever their process ids.

use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::sync::Mutex;

/// 127.A.B.0/24, as `(A, B)`.
pub type Subnet = (u8, u8);

/// The host of a subnet that carries its claim; fixtures leave it alone.
pub const CLAIM_HOST: u8 = 254;

/// The port of a claim's listener: above Linux's ephemeral range (32768–60999), so no
/// socket bound to port 0 takes it by chance.
pub const CLAIM_PORT: u16 = 61000;

/// The second octets reservations come from: 127.2.0.0/24 to 127.19.255.0/24. Clear of
/// 127.0.x (the host's own 127.0.0.1, the local stack's 127.0.1.x) and of the ranges the
/// fixtures before this crate picked from their process id (A = 20–249), which test binaries
/// built from older checkouts may still use.
pub const FIRST_A: u8 = 2;
pub const LAST_A: u8 = 19;

/// How many subnets there are to reserve.
pub const SUBNETS: usize = (LAST_A - FIRST_A + 1) as usize * 256;

/// Between the starting points of two consecutive process ids: a process can reserve this
/// many subnets before it meets the claims of the next one (which it then skips). Prime, so
/// every start is reachable.
const STRIDE: usize = 97;

/// Reserves subnets, scanning from a starting point. Its claims are held while it lives;
/// [`next_subnet`] uses one that lives as long as the process.
pub struct SubnetReserver {
    next: usize,
    held: Vec<TcpListener>,
}

impl SubnetReserver {
    /// A reserver that scans from the `index`th subnet of the range (any number; it wraps).
    pub fn starting_at(index: usize) -> Self {
        Self {
            next: index % SUBNETS,
            held: Vec::new(),
        }
    }

    /// A reserver whose scan starts where this process id points, so that concurrent
    /// processes mostly start far apart.
    pub fn for_this_process() -> Self {
        Self::starting_at((std::process::id() as usize).wrapping_mul(STRIDE))
    }

    /// Claims the next free subnet. Panics when every subnet in the range is taken (after
    /// one pass over it), or when loopback addresses beyond 127.0.0.1 cannot be bound.
    pub fn reserve(&mut self) -> Subnet {
        for _ in 0..SUBNETS {
            let subnet = nth_subnet(self.next);
            self.next = (self.next + 1) % SUBNETS;
            let claim = SocketAddr::new(ip(subnet, CLAIM_HOST), CLAIM_PORT);
            match TcpListener::bind(claim) {
                Ok(listener) => {
                    self.held.push(listener);
                    return subnet;
                }
                Err(e) if e.kind() == ErrorKind::AddrInUse => continue,
                Err(e) => panic!(
                    "cannot claim a test subnet by listening on {claim}: {e} (the tests need \
                     all of 127.0.0.0/8 on the loopback interface, as Linux has it)"
                ),
            }
        }
        panic!(
            "no free test subnet: all {SUBNETS} of 127.{FIRST_A}.0.0/24 to 127.{LAST_A}.255.0/24 \
             are claimed (a claim is a listener on 127.A.B.{CLAIM_HOST}:{CLAIM_PORT}); too many \
             test processes at once, or something listening on 0.0.0.0:{CLAIM_PORT}"
        )
    }

    /// The subnets this reserver holds, in the order it claimed them.
    pub fn held(&self) -> Vec<Subnet> {
        self.held
            .iter()
            .map(|l| match l.local_addr().unwrap().ip() {
                IpAddr::V4(v4) => (v4.octets()[1], v4.octets()[2]),
                IpAddr::V6(_) => unreachable!("claims are IPv4"),
            })
            .collect()
    }
}

fn nth_subnet(index: usize) -> Subnet {
    (FIRST_A + (index / 256) as u8, (index % 256) as u8)
}

/// A subnet of this test process's own, held until the process exits.
pub fn next_subnet() -> Subnet {
    static RESERVER: Mutex<Option<SubnetReserver>> = Mutex::new(None);
    let mut reserver = RESERVER.lock().unwrap_or_else(|e| e.into_inner());
    reserver
        .get_or_insert_with(SubnetReserver::for_this_process)
        .reserve()
}

/// Host `host` of `subnet`.
pub fn ip(subnet: Subnet, host: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, subnet.0, subnet.1, host))
}

/// 127.0.0.1 on a port the system picks when it is bound.
pub const LOCALHOST_ANY_PORT: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
