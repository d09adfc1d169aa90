//! Policy lookups on the accept path: a 100,000-entry blocklist (parse and lookup) and the
//! rate limiter. `cargo bench -p kas-edge --bench policies`.

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

criterion_group!(benches, blocklist, ratelimit);
criterion_main!(benches);
