//! Policy lookups on the accept path: a 100,000-entry blocklist (parse and lookup) and the
//! rate limiter, quiet and under a flood of unique clients.
//! `cargo bench -p kas-edge --bench policies` (`-- ratelimit_per_check` for the flood).

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kas_edge::policy::blocklist::Blocklist;
use kas_edge::policy::ratelimit::{AgentToken, Limiter, LimitsConfig};

/// A deterministic mix like a real incident list: single addresses, /24s, IPv6 /64s and
/// /128s, some allow exceptions and previews.
fn blocklist_text(entries: u32) -> String {
    let mut out = String::with_capacity(entries as usize * 32);
    for i in 0..entries {
        let a = (i.wrapping_mul(2_654_435_761)) | 0x0100_0000;
        let line = match i % 10 {
            0..=5 => format!("{}  # host {i}\n", Ipv4Addr::from(a)),
            6 => format!("{}/24\n", Ipv4Addr::from(a & 0xffff_ff00)),
            7 => format!("2001:db8:{:x}:{:x}::/64\n", i >> 16, i & 0xffff),
            8 => format!("2001:db8:{:x}:{:x}::1\n", i >> 16, i & 0xffff),
            _ => format!("preview {}\n", Ipv4Addr::from(a ^ 0x5555)),
        };
        out.push_str(&line);
    }
    out
}

fn probes(n: u32) -> Vec<IpAddr> {
    (0..n)
        .map(|i| match i % 3 {
            0 => IpAddr::V4(Ipv4Addr::from(i.wrapping_mul(2_654_435_761) | 0x0100_0000)),
            1 => IpAddr::V4(Ipv4Addr::from(i.wrapping_mul(40_503))),
            _ => IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, i as u16, 0, 0, 0, 1)),
        })
        .collect()
}

fn blocklist(c: &mut Criterion) {
    let text = blocklist_text(100_000);
    let mut group = c.benchmark_group("blocklist_100k");
    group.sample_size(10);
    group.bench_function("parse", |b| {
        b.iter(|| Blocklist::parse("bench.txt", black_box(&text)).expect("valid"))
    });
    group.finish();

    let list = Blocklist::parse("bench.txt", &text).expect("valid");
    let ips = probes(4096);
    let mut group = c.benchmark_group("blocklist_100k_lookup");
    group.throughput(Throughput::Elements(ips.len() as u64));
    group.bench_function("check_4096_mixed", |b| {
        b.iter(|| {
            let mut denied = 0usize;
            for ip in &ips {
                denied += usize::from(list.check(black_box(*ip)).is_deny());
            }
            denied
        })
    });
    group.finish();
}

fn ratelimit(c: &mut Criterion) {
    let config = LimitsConfig::parse(
        "bench.toml",
        "[per_ip]\nnew_connections_per_second = 1000000\nrequests_per_second = 1000000\n\
         [per_token]\nnew_streams_per_minute = 100000000\n",
    )
    .expect("valid");
    let limiter = Limiter::new(config);
    let ips = probes(4096);
    let token = http::HeaderMap::from_iter([(
        http::header::AUTHORIZATION,
        http::HeaderValue::from_static("Bearer glagent-bench-token"),
    )]);
    let token = AgentToken::from_headers(&token).expect("a bearer token");
    let mut group = c.benchmark_group("ratelimit");
    group.throughput(Throughput::Elements(ips.len() as u64));
    group.bench_function("check_connection_4096_keys", |b| {
        b.iter(|| {
            ips.iter()
                .filter(|ip| limiter.check_connection(**ip).is_ok())
                .count()
        })
    });
    group.bench_function("check_token_4096", |b| {
        b.iter(|| {
            ips.iter()
                .filter(|ip| limiter.check_token(**ip, token).is_ok())
                .count()
        })
    });
    group.finish();
}

/// Client `n` of a flood: every one a new IPv4 address or IPv6 /64.
fn flood_client(n: u64) -> IpAddr {
    let n = n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    if n & 1 == 0 {
        IpAddr::V4(Ipv4Addr::from((n >> 32) as u32))
    } else {
        let [a, b, c, d, ..] = n.to_be_bytes();
        IpAddr::V6(Ipv6Addr::new(
            0x2001,
            u16::from_be_bytes([a, b]),
            u16::from_be_bytes([c, d]),
            (n >> 16) as u16,
            0,
            0,
            0,
            1,
        ))
    }
}

/// Limits like production's (policies/limits.toml), bans on, 100,000 keys.
const PRODUCTION: &str = "max_tracked_keys = 100000\n\
    [per_ip]\nnew_connections_per_second = 20\nnew_connections_burst = 100\n\
    requests_per_second = 200\nrequests_burst = 400\n[ban]\nviolations = 50\n";

/// The same with rates no client reaches: a client checked again and again stays admitted.
const UNREACHABLE: &str = "max_tracked_keys = 100000\n\
    [per_ip]\nnew_connections_per_second = 1000000\nrequests_per_second = 1000000\n\
    [ban]\nviolations = 50\n";

/// Checks a new connection and a request from `ip`, as a client's first request costs.
fn connect_and_request(limiter: &Limiter, ip: IpAddr) -> (bool, bool) {
    (
        limiter.check_connection(black_box(ip)).is_ok(),
        limiter.check_request(black_box(ip)).is_ok(),
    )
}

/// A limiter whose table is full: `bound` flood clients (two keys each) went through it.
fn full_limiter(limits: &str, n: &mut u64) -> Limiter {
    let limiter = Limiter::new(LimitsConfig::parse("bench.toml", limits).expect("valid"));
    for _ in 0..limiter.config().max_keys() {
        *n += 1;
        connect_and_request(&limiter, flood_client(*n));
    }
    assert!(limiter.tracked_keys() > limiter.config().max_keys() * 8 / 10);
    limiter
}

/// The cost of one client's connection and request (two checks, all admitted) with the
/// default bound of 100,000 keys:
/// - `quiet_256_clients`: a few hundred known clients, a small table in cache;
/// - `flood_unique_clients_full_table`: the table full and churning under a flood of unique
///   clients (IPv4 addresses and IPv6 /64s), each check a new key that evicts the least
///   recently used one, with production's rates (a flood key stays recent long after its
///   check, which is what made the old limiter rescan its table on every check);
/// - `known_40k_clients_full_table`: the same full table checked by 40,000 clients it
///   knows, in a scattered order: no evictions, only the cache misses of a big table.
///
/// Nothing on the check path looks at more than one entry, so the flood costs the quiet
/// table's work plus an eviction and the cache misses of a table that does not fit in cache.
fn ratelimit_flood(c: &mut Criterion) {
    let mut group = c.benchmark_group("ratelimit_per_check");
    group.throughput(Throughput::Elements(1));

    let quiet = Limiter::new(LimitsConfig::parse("bench.toml", UNREACHABLE).expect("valid"));
    let regulars: Vec<IpAddr> = (0..256).map(flood_client).collect();
    let mut i = 0usize;
    group.bench_function("quiet_256_clients", |b| {
        b.iter(|| {
            i = (i + 1) % regulars.len();
            connect_and_request(&quiet, regulars[i])
        })
    });
    assert!(quiet.tracked_keys() <= 512);

    let mut n = 1u64 << 40;
    let flooded = full_limiter(PRODUCTION, &mut n);
    let bound = flooded.config().max_keys();
    group.bench_function("flood_unique_clients_full_table", |b| {
        b.iter(|| {
            n += 1;
            connect_and_request(&flooded, flood_client(n))
        })
    });
    assert!(
        flooded.tracked_keys() <= bound,
        "{}",
        flooded.tracked_keys()
    );

    let full = full_limiter(UNREACHABLE, &mut n);
    let known: Vec<IpAddr> = (0..40_000).map(|k| flood_client(k + (1 << 50))).collect();
    for ip in &known {
        connect_and_request(&full, *ip);
    }
    let mut k = 0usize;
    group.bench_function("known_40k_clients_full_table", |b| {
        b.iter(|| {
            k = (k + 7_919) % known.len();
            connect_and_request(&full, known[k])
        })
    });
    group.finish();
    assert!(full.tracked_keys() <= bound, "{}", full.tracked_keys());
}

criterion_group!(benches, blocklist, ratelimit, ratelimit_flood);
criterion_main!(benches);
