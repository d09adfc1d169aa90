use super::*;
use std::net::{Ipv4Addr, Ipv6Addr};

fn ip(n: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x7f00_0000 + n))
}

/// Address `n` of the IPv6 /64 number `net`.
fn v6(net: u16, n: u64) -> IpAddr {
    let [a, b, c, d] = [
        (n >> 48) as u16,
        (n >> 32) as u16,
        (n >> 16) as u16,
        n as u16,
    ];
    IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, net, a, b, c, d))
}

fn limiter(text: &str) -> Limiter {
    Limiter::new(LimitsConfig::parse("limits.toml", text).unwrap())
}

fn headers(authorization: &str) -> http::HeaderMap {
    let mut h = http::HeaderMap::new();
    h.insert(
        http::header::AUTHORIZATION,
        http::HeaderValue::from_str(authorization).unwrap(),
    );
    h
}

fn check_token(limiter: &Limiter, ip: IpAddr, authorization: &str) -> Result<(), Refusal> {
    let h = headers(authorization);
    limiter.check_token(ip, AgentToken::from_headers(&h).expect("a bearer token"))
}

#[test]
fn parse_errors_name_the_field_and_line() {
    let err = LimitsConfig::parse("limits.toml", "[per_ip]\nrequests_per_secnd = 5\n").unwrap_err();
    assert!(
        err.to_string().contains("requests_per_secnd") && err.to_string().contains("line 2"),
        "{err}"
    );
    let err =
        LimitsConfig::parse("limits.toml", "[per_ip]\nrequests_per_second = 0\n").unwrap_err();
    assert!(
        err.to_string().contains("per_ip.requests_per_second"),
        "{err}"
    );
    assert_eq!(
        LimitsConfig::parse("l", "").unwrap(),
        LimitsConfig::default()
    );
    let err = LimitsConfig::parse("l", "max_tracked_keys = 10\n").unwrap_err();
    assert!(err.to_string().contains("max_tracked_keys"), "{err}");
}

#[test]
fn key_prefixes_are_read_and_validated_with_file_line_and_field() {
    let config = LimitsConfig::parse("l", "[keys]\nipv4_prefix = 24\nipv6_prefix = 56\n").unwrap();
    assert_eq!(config.keys.prefixes(), KeyPrefixes::new(24, 56).unwrap());
    assert_eq!(
        LimitsConfig::parse("l", "").unwrap().keys.prefixes(),
        KeyPrefixes::DEFAULT
    );
    for (text, field, line) in [
        ("[keys]\nipv4_prefix = 8\n", "keys.ipv4_prefix", "line 2"),
        ("[keys]\nipv4_prefix = 33\n", "keys.ipv4_prefix", "line 2"),
        ("\n[keys]\nipv6_prefix = 16\n", "keys.ipv6_prefix", "line 3"),
        ("[keys]\nipv6_prefix = 129\n", "keys.ipv6_prefix", "line 2"),
        ("[keys]\nipv6_prefix = 300\n", "ipv6_prefix", "line 2"),
        ("[keys]\nipv6_prefix = -1\n", "ipv6_prefix", "line 2"),
        ("[keys]\nipv6 = 64\n", "ipv6", "line 2"),
    ] {
        let err = LimitsConfig::parse("policies/limits.toml", text)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("policies/limits.toml: ") && err.contains(field) && err.contains(line),
            "{text:?}: {err}"
        );
    }
}

#[test]
fn the_per_token_limit_is_named_for_streams_and_the_old_name_still_works() {
    let new = LimitsConfig::parse("l", "[per_token]\nnew_streams_per_minute = 7\n").unwrap();
    assert_eq!(new.per_token.new_streams_per_minute, Some(7));
    assert!(new.warnings().is_empty());

    let old = LimitsConfig::parse(
        "policies/limits.toml",
        "# limits\n[per_token]\nnew_connections_per_minute = 7\n",
    )
    .unwrap();
    assert_eq!(old.per_token.new_streams_per_minute, Some(7));
    assert_eq!(old, new, "the same limits, only spelled differently");
    let [warning] = old.warnings() else {
        panic!("one warning: {:?}", old.warnings())
    };
    assert!(
        warning.starts_with("policies/limits.toml:3: ")
            && warning.contains("deprecated")
            && warning.contains("per_token.new_streams_per_minute"),
        "{warning}"
    );

    let both = LimitsConfig::parse(
        "l",
        "[per_token]\nnew_streams_per_minute = 7\nnew_connections_per_minute = 9\n",
    )
    .unwrap_err()
    .to_string();
    assert!(
        both.contains("new_connections_per_minute") && both.contains("line 3"),
        "{both}"
    );
    let zero = LimitsConfig::parse("l", "[per_token]\nnew_connections_per_minute = 0\n")
        .unwrap_err()
        .to_string();
    assert!(
        zero.contains("per_token.new_connections_per_minute"),
        "{zero}"
    );
}

#[test]
fn connection_rate_refuses_with_retry_after() {
    let limiter = limiter("[per_ip]\nnew_connections_per_second = 1\nnew_connections_burst = 2\n");
    assert!(limiter.check_connection(ip(1)).is_ok());
    assert!(limiter.check_connection(ip(1)).is_ok());
    let refusal = limiter.check_connection(ip(1)).unwrap_err();
    assert_eq!(refusal.reason, "connection_rate");
    assert!(refusal.retry_after > Duration::ZERO && refusal.retry_after <= Duration::from_secs(1));
    assert!(
        limiter.check_connection(ip(2)).is_ok(),
        "other clients are unaffected"
    );
}

#[test]
fn rotating_through_an_ipv6_slash_64_gains_nothing() {
    // New connections, requests, concurrency and bans: each counts the /64, whichever of
    // its addresses the client uses. Keyed by address, every new address was a fresh
    // budget.
    let limiter = limiter(
        "[per_ip]\nnew_connections_per_second = 1\nnew_connections_burst = 3\n\
             requests_per_second = 1\nrequests_burst = 3\nmax_concurrent_connections = 2\n\
             [ban]\nviolations = 5\n",
    );
    let results: Vec<bool> = (1..=4)
        .map(|n| limiter.check_connection(v6(2, n)).is_ok())
        .collect();
    assert_eq!(results, [true, true, true, false]);
    let results: Vec<bool> = (100..104)
        .map(|n| limiter.check_request(v6(2, n << 40)).is_ok())
        .collect();
    assert_eq!(results, [true, true, true, false]);
    assert_eq!(
        limiter.key(v6(2, 1)),
        limiter.key(v6(2, u64::MAX)),
        "the registry counts open connections by this key"
    );
    assert!(limiter.check_concurrency(v6(2, 9), 2).is_err());
    // Two violations so far; three more from yet other addresses ban the /64.
    for n in 200..203 {
        let _ = limiter.check_request(v6(2, n));
    }
    assert_eq!(
        limiter.check_connection(v6(2, 0xdead)).unwrap_err().reason,
        "banned"
    );
    // The neighbouring /64 is another client.
    assert!(limiter.check_connection(v6(3, 1)).is_ok());
    assert!(limiter.check_request(v6(3, 1)).is_ok());
}

#[test]
fn key_prefixes_are_configurable() {
    let per_address = limiter(
        "[keys]\nipv6_prefix = 128\n[per_ip]\nnew_connections_per_second = 1\n\
             new_connections_burst = 1\n",
    );
    assert!((1..=10).all(|n| per_address.check_connection(v6(2, n)).is_ok()));
    let per_24 = limiter(
        "[keys]\nipv4_prefix = 24\n[per_ip]\nnew_connections_per_second = 1\n\
             new_connections_burst = 1\n",
    );
    assert!(per_24
        .check_connection("192.0.2.1".parse().unwrap())
        .is_ok());
    assert!(per_24
        .check_connection("192.0.2.77".parse().unwrap())
        .is_err());
    assert!(per_24
        .check_connection("::ffff:192.0.2.78".parse().unwrap())
        .is_err());
    assert!(per_24
        .check_connection("192.0.3.1".parse().unwrap())
        .is_ok());
}

#[test]
fn tokens_are_isolated_from_each_other() {
    let limiter = limiter("[per_token]\nnew_streams_per_minute = 2\n");
    let same_ip = ip(9);
    assert!(check_token(&limiter, same_ip, "Bearer token-a").is_ok());
    assert!(check_token(&limiter, same_ip, "Bearer token-a").is_ok());
    assert_eq!(
        check_token(&limiter, same_ip, "Bearer token-a")
            .unwrap_err()
            .reason,
        "token_connection_rate"
    );
    assert!(check_token(&limiter, same_ip, "Bearer token-b").is_ok());
}

#[test]
fn every_spelling_kas_accepts_is_the_same_token() {
    let limiter = limiter("[per_token]\nnew_streams_per_minute = 3\n");
    for (n, spelling) in ["Bearer t0k", "bearer  t0k ", "BEARER \tt0k"]
        .into_iter()
        .enumerate()
    {
        assert!(
            check_token(&limiter, ip(n as u32), spelling).is_ok(),
            "{spelling:?}"
        );
    }
    assert!(check_token(&limiter, ip(7), "BeArEr t0k").is_err());
    for not_a_token in ["Basic t0k", "Bearer", "Bearer   ", "t0k"] {
        assert!(
            AgentToken::from_headers(&headers(not_a_token)).is_none(),
            "{not_a_token:?}"
        );
    }
    assert!(AgentToken::from_headers(&http::HeaderMap::new()).is_none());
    let mut non_text = http::HeaderMap::new();
    non_text.insert(
        http::header::AUTHORIZATION,
        http::HeaderValue::from_bytes(b"Bearer t\xff").unwrap(),
    );
    assert!(
        AgentToken::from_headers(&non_text).is_none(),
        "kas refuses it too"
    );
}

#[test]
fn repeated_violations_ban_the_client() {
    let limiter = limiter(
            "[per_ip]\nrequests_per_second = 1\n[ban]\nviolations = 3\nwindow = \"1m\"\nduration = \"10m\"\n",
        );
    assert!(limiter.check_request(ip(3)).is_ok());
    for _ in 0..2 {
        assert_eq!(
            limiter.check_request(ip(3)).unwrap_err().reason,
            "request_rate"
        );
    }
    let ban = limiter.check_request(ip(3)).unwrap_err();
    assert_eq!(ban.reason, "banned");
    assert!(ban.retry_after > Duration::from_secs(500));
    assert_eq!(
        limiter.check_connection(ip(3)).unwrap_err().reason,
        "banned"
    );
    assert!(limiter.check_request(ip(4)).is_ok());
}

#[test]
fn a_ban_ends_after_its_duration() {
    let limiter = limiter(
        "[per_ip]\nmax_concurrent_connections = 1\n[ban]\nviolations = 1\nduration = \"50ms\"\n",
    );
    assert_eq!(
        limiter.check_concurrency(ip(1), 1).unwrap_err().reason,
        "banned"
    );
    assert!(limiter.check_concurrency(ip(1), 0).is_err());
    std::thread::sleep(Duration::from_millis(80));
    assert!(limiter.check_concurrency(ip(1), 0).is_ok());
    assert_eq!(limiter.tracked_keys(), 0, "the ban is gone");
}

#[test]
fn concurrency_limit() {
    let limiter = limiter("[per_ip]\nmax_concurrent_connections = 2\n");
    assert!(limiter.check_concurrency(ip(1), 1).is_ok());
    assert_eq!(
        limiter.check_concurrency(ip(1), 2).unwrap_err().reason,
        "concurrent_connections"
    );
}

#[test]
fn a_full_ban_table_lets_the_ban_that_ends_first_go() {
    // 640 keys: 64 for bans (one shard), the rest for rates.
    let limiter = limiter(
        "max_tracked_keys = 640\n[per_ip]\nmax_concurrent_connections = 1\n\
             [ban]\nviolations = 1\n",
    );
    assert_eq!(limiter.capacity(), 640);
    for n in 0..65 {
        assert_eq!(
            limiter.check_concurrency(ip(n), 1).unwrap_err().reason,
            "banned"
        );
    }
    assert!(limiter.tracked_keys() <= 640);
    assert!(
        limiter.check_concurrency(ip(0), 0).is_ok(),
        "the oldest ban made room"
    );
    assert!((1..65).all(|n| limiter.check_concurrency(ip(n), 0).is_err()));
}

#[test]
fn idle_keys_are_swept() {
    let limiter = limiter(
            "[per_ip]\nnew_connections_per_second = 1000\nrequests_per_second = 1000\n\
             [ban]\nviolations = 10\nwindow = \"10ms\"\n[per_token]\nnew_streams_per_minute = 100000\n",
        );
    for n in 0..1000 {
        let _ = limiter.check_connection(ip(n));
        let _ = limiter.check_request(ip(n));
        let _ = check_token(&limiter, ip(n), &format!("Bearer t{n}"));
    }
    let _ = limiter.note(
        limiter.key(ip(1)),
        Err(Refusal {
            reason: "test",
            retry_after: Duration::ZERO,
        }),
    );
    assert_eq!(limiter.tracked_keys(), 3001);
    // Every key was used once at a high rate (fresh again within 1 ms); the violation
    // window is 10 ms.
    std::thread::sleep(Duration::from_millis(20));
    limiter.evict_idle();
    assert_eq!(limiter.tracked_keys(), 0);
}

#[test]
fn a_million_distinct_keys_never_exceed_the_bound() {
    // Slow rates: a flood key stays "recent" for a second or more, so evicting idle keys
    // cannot keep up; only the size bound does. The old limiter grew to hundreds of
    // thousands of keys here, rescanning its whole table on every check past the bound.
    let evictions = IntCounter::new("e", "e").unwrap();
    let limiter = Limiter::with_evictions(
        LimitsConfig::parse(
            "l",
            "max_tracked_keys = 100000\n\
                 [per_ip]\nnew_connections_per_second = 1\nrequests_per_second = 1\n\
                 [ban]\nviolations = 3\nduration = \"10m\"\n",
        )
        .unwrap(),
        evictions.clone(),
    );
    let bound = limiter.config().max_keys();
    assert!(limiter.capacity() <= bound && limiter.capacity() > bound - 128);
    let banned = "2001:db8:bad::1".parse::<IpAddr>().unwrap();
    for _ in 0..4 {
        let _ = limiter.check_request(banned);
    }
    assert_eq!(limiter.check_request(banned).unwrap_err().reason, "banned");
    let started = Instant::now();
    let mut most = 0;
    for n in 0..1_000_000u32 {
        // Half IPv4 addresses, half IPv6 /64s: a million distinct clients.
        let client = if n % 2 == 0 {
            IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n))
        } else {
            let [a, b, c, d] = n.to_be_bytes();
            IpAddr::V6(Ipv6Addr::new(
                0x2001,
                0xdb8,
                u16::from_be_bytes([a, b]),
                u16::from_be_bytes([c, d]),
                0,
                0,
                0,
                1,
            ))
        };
        let _ = limiter.check_connection(client);
        let tracked = limiter.tracked_keys();
        assert!(tracked <= bound, "{tracked} keys after {n}");
        most = most.max(tracked);
    }
    let elapsed = started.elapsed();
    println!(
        "1,000,000 keys in {elapsed:?}: at most {most} tracked (bound {bound}), {} evicted",
        evictions.get()
    );
    assert!(most > bound * 8 / 10, "the table was used: {most}");
    assert!(evictions.get() >= 1_000_000 - bound as u64);
    assert_eq!(
        limiter.check_request(banned).unwrap_err().reason,
        "banned",
        "a flood of fresh keys does not end a ban"
    );
}

#[test]
fn a_client_that_keeps_sending_keeps_its_state_through_a_flood() {
    // Least recently used goes first: a client in the middle of being limited is used
    // all the time and stays. (Evicting by age instead would hand it a fresh burst
    // every `max_tracked_keys` new keys.)
    let limiter = limiter(
        "max_tracked_keys = 1000
[per_ip]
requests_per_second = 1
",
    );
    let hot = v6(7, 1);
    let mut allowed = 0;
    for n in 0..100_000u32 {
        let _ = limiter.check_request(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n)));
        if n % 10 == 0 {
            allowed += u32::from(limiter.check_request(hot).is_ok());
        }
    }
    assert!(allowed <= 2, "allowed {allowed} times");
}
