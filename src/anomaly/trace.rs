//! Seeded, deterministic traffic traces for replaying the detector in virtual time: steady
//! Zipf traffic, diurnal days, a flash crowd, abusers (alone, split over replicas, behind a
//! NAT), low-and-slow credential stuffing, a spoofed-source flood and path probing.
//!
//! Every generator is an iterator in time order (the 10-million-source flood is never held in
//! memory); [`merge`] interleaves several. Legitimate clients live in 1.0.0.0–99.255.255.255
//! and 2001:db8:1::/48; attackers in 198.18.0.0/15, 203.0.113.0/24 and 2001:db8:bad::/48, so a
//! test can tell every decision's side.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::event::{Event, Label};

/// SplitMix64: small, fast, and the same everywhere.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x6A09_E667_F3BC_C909)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }

    /// Exponential inter-arrival for a Poisson process of `rate` per second, in ms.
    pub fn gap_ms(&mut self, rate: f64) -> f64 {
        -(1.0 - self.unit()).ln() / rate.max(1e-9) * 1000.0
    }
}

/// Shape of the legitimate population.
#[derive(Clone, Debug)]
pub struct Population {
    pub seed: u64,
    pub identities: usize,
    /// Zipf exponent of identity popularity.
    pub zipf_s: f64,
    /// Requests per second of the whole population.
    pub rate: f64,
    /// Share of requests answered 401/403/404 (typos, expired tokens, stale links).
    pub failure_share: f64,
    /// Emit the access-log response event next to each request event.
    pub responses: bool,
}

impl Default for Population {
    fn default() -> Self {
        Population {
            seed: 1,
            identities: 100_000,
            zipf_s: 1.0,
            rate: 2000.0,
            failure_share: 0.02,
            responses: true,
        }
    }
}

/// The legitimate routes (Zipf-popular).
pub const ROUTES: usize = 30;

fn route(k: u64) -> Label {
    Label::new(&format!("/api/v1/r{k}"))
}

/// Identity `i`'s label.
pub fn user(i: u64) -> Label {
    Label::new(&format!("user-{i}"))
}

/// Identity `i`'s home address: IPv4 in 1.0.0.0–99.255.255.255 for 90 %, else a /64 of its
/// own in 2001:db8:1::/48.
pub fn home_ip(seed: u64, i: u64) -> IpAddr {
    let h = Rng::new(seed ^ i.wrapping_mul(0x2545_F491_4F6C_DD1D)).next_u64();
    if h % 10 == 9 {
        let subnet = (h >> 8) & 0xFFFF;
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, subnet as u16, 0, 0, 0, 1))
    } else {
        let v = 0x0100_0000 + ((h >> 16) as u32 % (99 * 0x0100_0000));
        IpAddr::V4(Ipv4Addr::from(v))
    }
}

/// Is `ip` inside the legitimate ranges?
pub fn is_legit_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => (1..=99).contains(&v4.octets()[0]),
        IpAddr::V6(v6) => v6.segments()[..3] == [0x2001, 0xdb8, 1],
    }
}

/// Cumulative Zipf weights over `n` ranks.
fn zipf_cdf(n: usize, s: f64) -> Vec<f64> {
    let mut acc = 0.0;
    let mut v: Vec<f64> = (1..=n.max(1))
        .map(|r| {
            acc += 1.0 / (r as f64).powf(s);
            acc
        })
        .collect();
    for x in &mut v {
        *x /= acc;
    }
    v
}

/// Steady or shaped Zipf traffic from the population, `from_ms..to_ms`; `shape(t_ms)` scales
/// the rate (1.0 = steady), `identity_offset` shifts identity numbers (a flash crowd uses
/// fresh ones) and `only_share` keeps one replica's share of a load-balanced stream.
pub struct Background {
    pop: Population,
    rng: Rng,
    cdf: Vec<f64>,
    route_cdf: Vec<f64>,
    routes: Vec<Label>,
    t: f64,
    to_ms: u64,
    shape: Box<dyn Fn(u64) -> f64 + Send>,
    peak: f64,
    identity_offset: u64,
    pending: Option<Event>,
}

impl Background {
    pub fn new(pop: Population, from_ms: u64, to_ms: u64) -> Background {
        Background::shaped(pop, from_ms, to_ms, 1.0, Box::new(|_| 1.0), 0)
    }

    /// `shape` must stay within `0..=peak`.
    pub fn shaped(
        pop: Population,
        from_ms: u64,
        to_ms: u64,
        peak: f64,
        shape: Box<dyn Fn(u64) -> f64 + Send>,
        identity_offset: u64,
    ) -> Background {
        Background {
            rng: Rng::new(pop.seed.wrapping_add(identity_offset)),
            cdf: zipf_cdf(pop.identities, pop.zipf_s),
            route_cdf: zipf_cdf(ROUTES, 1.0),
            routes: (0..ROUTES as u64).map(route).collect(),
            t: from_ms as f64,
            to_ms,
            shape,
            peak: peak.max(1e-9),
            identity_offset,
            pending: None,
            pop,
        }
    }
}

fn pick(cdf: &[f64], u: f64) -> usize {
    cdf.partition_point(|c| *c < u)
        .min(cdf.len().saturating_sub(1))
}

impl Iterator for Background {
    type Item = Event;

    fn next(&mut self) -> Option<Event> {
        if let Some(ev) = self.pending.take() {
            return Some(ev);
        }
        loop {
            // thinning: candidates at the peak rate, kept with probability shape/peak
            self.t += self.rng.gap_ms(self.pop.rate * self.peak);
            let at = self.t as u64;
            if at >= self.to_ms {
                return None;
            }
            if self.rng.unit() * self.peak > (self.shape)(at) {
                continue;
            }
            let i = pick(&self.cdf, self.rng.unit()) as u64 + self.identity_offset;
            let path = self.routes[pick(&self.route_cdf, self.rng.unit())];
            let ip = home_ip(self.pop.seed, i);
            let identity = user(i);
            let req = Event::request(at, ip, identity, path);
            if self.pop.responses {
                let status = if self.rng.unit() < self.pop.failure_share {
                    404
                } else {
                    200
                };
                self.pending = Some(Event::response(at, ip, identity, path, status));
            }
            return Some(req);
        }
    }
}

/// One client at a fixed `rate` per second (evenly spaced, seeded jitter), `from_ms..to_ms`.
pub struct Constant {
    rng: Rng,
    ip: IpAddr,
    identity: Label,
    path: Label,
    t: f64,
    gap: f64,
    to_ms: u64,
    status: u16,
    pending: Option<Event>,
}

impl Constant {
    pub fn new(
        seed: u64,
        ip: IpAddr,
        identity: Label,
        rate: f64,
        from_ms: u64,
        to_ms: u64,
    ) -> Constant {
        Constant {
            rng: Rng::new(seed),
            ip,
            identity,
            path: route(0),
            t: from_ms as f64,
            gap: 1000.0 / rate.max(1e-9),
            to_ms,
            status: 200,
            pending: None,
        }
    }
}

impl Iterator for Constant {
    type Item = Event;

    fn next(&mut self) -> Option<Event> {
        if let Some(ev) = self.pending.take() {
            return Some(ev);
        }
        let at = self.t as u64;
        if at >= self.to_ms {
            return None;
        }
        self.t += self.gap * (0.5 + self.rng.unit());
        self.pending = Some(Event::response(
            at,
            self.ip,
            self.identity,
            self.path,
            self.status,
        ));
        Some(Event::request(at, self.ip, self.identity, self.path))
    }
}

/// Address `n` of the low-and-slow botnet: 20 /24s in 198.18.0.0/15, 100 hosts each.
pub fn stuffing_ip(n: u64) -> IpAddr {
    let net = n % 20;
    let host = 1 + (n / 20) % 100;
    IpAddr::V4(Ipv4Addr::new(
        198,
        18 + (net / 10) as u8,
        (net % 10) as u8 * 7,
        host as u8,
    ))
}

/// Low-and-slow credential stuffing: `ips` addresses (see [`stuffing_ip`]), each a Poisson
/// source of `rate_per_ip`, unauthenticated POSTs to /login answered 401 `fail_share` of the
/// time.
pub struct Stuffing {
    rng: Rng,
    ips: u64,
    rate_per_ip: f64,
    fail_share: f64,
    t: f64,
    to_ms: u64,
    login: Label,
    pending: Option<Event>,
}

impl Stuffing {
    pub fn new(
        seed: u64,
        ips: u64,
        rate_per_ip: f64,
        fail_share: f64,
        from_ms: u64,
        to_ms: u64,
    ) -> Stuffing {
        Stuffing {
            rng: Rng::new(seed ^ 0x57FF),
            ips,
            rate_per_ip,
            fail_share,
            t: from_ms as f64,
            to_ms,
            login: Label::new("/login"),
            pending: None,
        }
    }
}

impl Iterator for Stuffing {
    type Item = Event;

    fn next(&mut self) -> Option<Event> {
        if let Some(ev) = self.pending.take() {
            return Some(ev);
        }
        self.t += self.rng.gap_ms(self.rate_per_ip * self.ips as f64);
        let at = self.t as u64;
        if at >= self.to_ms {
            return None;
        }
        let ip = stuffing_ip(self.rng.below(self.ips));
        let status = if self.rng.unit() < self.fail_share {
            401
        } else {
            200
        };
        self.pending = Some(Event::response(at, ip, Label::EMPTY, self.login, status));
        Some(Event::request(at, ip, Label::EMPTY, self.login))
    }
}

/// The /64s the spoofed flood's IPv6 half comes from: 2001:db8:bad:N::/64.
pub fn flood_v6_net(n: u16) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 0xbad, n, 0, 0, 0, 0)
}

/// A spoofed-source flood: `sources` one-shot requests at `rate` per second, half from random
/// IPv4 addresses (anywhere outside the legitimate ranges), half from random addresses inside
/// `v6_nets` /64s. Request events only (spoofed sources never complete a response).
pub struct Flood {
    rng: Rng,
    left: u64,
    t: f64,
    gap: f64,
    v6_nets: u16,
}

impl Flood {
    pub fn new(seed: u64, sources: u64, rate: f64, from_ms: u64, v6_nets: u16) -> Flood {
        Flood {
            rng: Rng::new(seed ^ 0xF100D),
            left: sources,
            t: from_ms as f64,
            gap: 1000.0 / rate,
            v6_nets: v6_nets.max(1),
        }
    }
}

impl Iterator for Flood {
    type Item = Event;

    fn next(&mut self) -> Option<Event> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let at = self.t as u64;
        self.t += self.gap;
        let r = self.rng.next_u64();
        let ip = if r & 1 == 0 {
            // 100.0.0.0 and up: never a legitimate address
            IpAddr::V4(Ipv4Addr::from(
                0x6400_0000 + ((r >> 1) as u32 % 0x9000_0000),
            ))
        } else {
            let net = u128::from(flood_v6_net((r >> 1) as u16 % self.v6_nets));
            IpAddr::V6(Ipv6Addr::from(net | u128::from(self.rng.next_u64())))
        };
        Some(Event::request(at, ip, Label::EMPTY, Label::new("/")))
    }
}

/// Prober `n` of 50: 203.0.113.n+1.
pub fn prober_ip(n: u64) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(203, 0, 113, (n % 250) as u8 + 1))
}

/// `probers` addresses each requesting random paths among `paths` at `rate` per second; 95 %
/// answered 404.
pub struct Probing {
    rng: Rng,
    probers: u64,
    paths: Vec<Label>,
    rate: f64,
    t: f64,
    to_ms: u64,
    pending: Option<Event>,
}

impl Probing {
    pub fn new(
        seed: u64,
        probers: u64,
        paths: u64,
        rate: f64,
        from_ms: u64,
        to_ms: u64,
    ) -> Probing {
        Probing {
            rng: Rng::new(seed ^ 0x9A7),
            probers,
            paths: (0..paths)
                .map(|k| Label::new(&format!("/.probe/{k}/admin.php")))
                .collect(),
            rate,
            t: from_ms as f64,
            to_ms,
            pending: None,
        }
    }
}

impl Iterator for Probing {
    type Item = Event;

    fn next(&mut self) -> Option<Event> {
        if let Some(ev) = self.pending.take() {
            return Some(ev);
        }
        self.t += self.rng.gap_ms(self.rate * self.probers as f64);
        let at = self.t as u64;
        if at >= self.to_ms {
            return None;
        }
        let ip = prober_ip(self.rng.below(self.probers));
        let path = self.paths[self.rng.below(self.paths.len() as u64) as usize];
        let status = if self.rng.unit() < 0.95 { 404 } else { 200 };
        self.pending = Some(Event::response(at, ip, Label::EMPTY, path, status));
        Some(Event::request(at, ip, Label::EMPTY, path))
    }
}

/// The NAT office's one public address.
pub const OFFICE_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(42, 42, 42, 42));

/// Office user `i`'s identity.
pub fn office_user(i: u64) -> Label {
    Label::new(&format!("office-{i}"))
}

/// `users` identities behind [`OFFICE_IP`], each a Poisson source of `rate_per_user`.
pub fn office(
    seed: u64,
    users: u64,
    rate_per_user: f64,
    from_ms: u64,
    to_ms: u64,
) -> impl Iterator<Item = Event> {
    let mut rng = Rng::new(seed ^ 0x0FF1CE);
    let mut t = from_ms as f64;
    let path = route(1);
    let mut pending: Option<Event> = None;
    std::iter::from_fn(move || {
        if let Some(ev) = pending.take() {
            return Some(ev);
        }
        t += rng.gap_ms(rate_per_user * users as f64);
        let at = t as u64;
        if at >= to_ms {
            return None;
        }
        let id = office_user(rng.below(users));
        pending = Some(Event::response(at, OFFICE_IP, id, path, 200));
        Some(Event::request(at, OFFICE_IP, id, path))
    })
}

/// Interleaves time-ordered streams into one time-ordered stream.
pub fn merge(streams: Vec<Box<dyn Iterator<Item = Event> + Send>>) -> impl Iterator<Item = Event> {
    let mut streams: Vec<_> = streams.into_iter().map(|s| s.peekable()).collect();
    std::iter::from_fn(move || {
        let mut best: Option<(usize, u64)> = None;
        for (i, s) in streams.iter_mut().enumerate() {
            if let Some(ev) = s.peek()
                && best.is_none_or(|(_, t)| ev.at_ms < t)
            {
                best = Some((i, ev.at_ms));
            }
        }
        best.and_then(|(i, _)| streams[i].next())
    })
}

/// The population's p99 of per-identity requests per second (over identities active in a
/// second), measured on `seconds` of its steady traffic.
pub fn measured_p99(pop: &Population, seconds: u64) -> f64 {
    let mut per_second: std::collections::HashMap<u64, u32> = std::collections::HashMap::new();
    let mut all = Vec::new();
    let mut sec = 0;
    let quiet = Population {
        responses: false,
        ..pop.clone()
    };
    for ev in Background::new(quiet, 0, seconds * 1000) {
        if ev.at_ms / 1000 != sec {
            all.extend(per_second.drain().map(|(_, c)| c));
            sec = ev.at_ms / 1000;
        }
        *per_second.entry(ev.identity.hash()).or_insert(0) += 1;
    }
    all.extend(per_second.into_values());
    all.sort_unstable();
    all.get(all.len().saturating_sub(1) * 99 / 100)
        .map_or(1.0, |c| f64::from(*c))
}
