//! IP networks and the prefix trie that looks an address up among many of them.
//!
//! Owns: one address space for IPv4 and IPv6 (an IPv4 address is its IPv4-mapped IPv6 form,
//! `::ffff:a.b.c.d`, so `10.0.0.0/8` is `::ffff:10.0.0.0/104` and one trie holds both
//! families), parsing and canonical printing of addresses and CIDRs, and `PrefixTrie`: a
//! path-compressed binary trie whose lookup walks at most one node per distinct prefix length
//! on the address's path — never a scan of the entries.
//!
//! Must not touch: what an entry means (lists), where addresses come from (identity).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// An address in the unified space (IPv4 as IPv4-mapped IPv6).
pub type Addr = u128;

const V4_MAPPED: u128 = 0xffff_u128 << 32;

/// The unified form of an address.
pub fn addr(ip: IpAddr) -> Addr {
    match ip {
        IpAddr::V4(v4) => V4_MAPPED | u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// Whether a unified address is an IPv4 one.
pub fn is_v4(a: Addr) -> bool {
    a >> 32 == 0xffff
}

/// Back to an `IpAddr`, IPv4 when mapped: Envoy on a dual-stack listener reports
/// `::ffff:1.2.3.4`, which is the same client as `1.2.3.4`.
pub fn to_ip(a: Addr) -> IpAddr {
    if is_v4(a) {
        IpAddr::V4(Ipv4Addr::from(a as u32))
    } else {
        IpAddr::V6(Ipv6Addr::from(a))
    }
}

/// Parses an address as Envoy and proxies write it: IPv4, IPv6, bracketed IPv6, with an
/// optional port (`1.2.3.4:5678`, `[::1]:80`). `None` for anything else.
pub fn parse_addr(s: &str) -> Option<Addr> {
    let s = s.trim();
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(addr(ip));
    }
    if let Some(rest) = s.strip_prefix('[') {
        let (inner, _) = rest.split_once(']')?;
        return inner
            .parse::<Ipv6Addr>()
            .ok()
            .map(|v6| addr(IpAddr::V6(v6)));
    }
    let (host, port) = s.rsplit_once(':')?;
    if port.bytes().all(|b| b.is_ascii_digit()) && !port.is_empty() {
        return host.parse::<Ipv4Addr>().ok().map(|v4| addr(IpAddr::V4(v4)));
    }
    None
}

fn mask(a: Addr, len: u8) -> Addr {
    if len == 0 {
        0
    } else {
        a & (u128::MAX << (128 - u32::from(len)))
    }
}

/// A network: an address with the length of its prefix, both in the unified space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpNet {
    addr: Addr,
    len: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetError {
    #[error("{0:?} is not an IP address")]
    BadAddress(String),
    #[error("{0:?} is not a prefix length (0-32 for IPv4, 0-128 for IPv6)")]
    BadLength(String),
    #[error("{0:?} has host bits set (did you mean {1}?)")]
    HostBits(String, String),
}

impl IpNet {
    /// One address (`/32` or `/128`).
    pub fn host(a: Addr) -> IpNet {
        IpNet { addr: a, len: 128 }
    }

    /// `a.b.c.d/n`, `x::y/n` or a bare address. Host bits must be zero, as in every router
    /// config: `10.0.0.1/8` is more likely a typo than a network.
    pub fn parse(s: &str) -> Result<IpNet, NetError> {
        let s = s.trim();
        let (ip, len) = match s.split_once('/') {
            Some((ip, len)) => (ip, Some(len)),
            None => (s, None),
        };
        let ip: IpAddr = ip
            .parse()
            .map_err(|_| NetError::BadAddress(ip.to_string()))?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let len = match len {
            None => max,
            Some(l) => match l.parse::<u8>() {
                Ok(n) if n <= max && !l.starts_with('+') => n,
                _ => return Err(NetError::BadLength(l.to_string())),
            },
        };
        let unified_len = if ip.is_ipv4() { len + 96 } else { len };
        let a = addr(ip);
        let net = IpNet {
            addr: mask(a, unified_len),
            len: unified_len,
        };
        if net.addr != a {
            return Err(NetError::HostBits(s.to_string(), net.to_string()));
        }
        Ok(net)
    }

    pub fn contains(&self, a: Addr) -> bool {
        mask(a, self.len) == self.addr
    }

    /// Prefix length in the unified space (an IPv4 `/24` is 120).
    pub fn unified_len(&self) -> u8 {
        self.len
    }

    pub fn network(&self) -> Addr {
        self.addr
    }

    /// The network of `a` with the given IPv4 or IPv6 prefix length (Envoy's
    /// `masked_remote_address`).
    pub fn masked(a: Addr, v4_len: u8, v6_len: u8) -> IpNet {
        let len = if is_v4(a) {
            96 + v4_len.min(32)
        } else {
            v6_len.min(128)
        };
        IpNet {
            addr: mask(a, len),
            len,
        }
    }

    fn is_v4_net(&self) -> bool {
        self.len >= 96 && is_v4(self.addr)
    }
}

/// Canonical text: `10.0.0.0/8`, `2001:db8::/32`, and a bare address for a single host.
impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_v4_net() {
            write!(f, "{}", Ipv4Addr::from(self.addr as u32))?;
            if self.len < 128 {
                write!(f, "/{}", self.len - 96)?;
            }
        } else {
            write!(f, "{}", Ipv6Addr::from(self.addr))?;
            if self.len < 128 {
                write!(f, "/{}", self.len)?;
            }
        }
        Ok(())
    }
}

/// An address printed without allocating (at most 39 bytes for IPv6): the client IP goes
/// into descriptors on every request.
#[derive(Clone, Copy)]
pub struct AddrText {
    buf: [u8; 48],
    len: u8,
}

impl AddrText {
    pub fn new(a: Addr) -> AddrText {
        Self::write(format_args!("{}", to_ip(a)))
    }

    pub fn net(n: &IpNet) -> AddrText {
        Self::write(format_args!("{n}"))
    }

    fn write(args: fmt::Arguments<'_>) -> AddrText {
        let mut t = AddrText {
            buf: [0; 48],
            len: 0,
        };
        let _ = fmt::write(&mut t, args);
        t
    }

    pub fn as_str(&self) -> &str {
        // Only `write_str` fills the buffer, with whole UTF-8 strings.
        std::str::from_utf8(&self.buf[..usize::from(self.len)]).unwrap_or_default()
    }
}

impl fmt::Write for AddrText {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let start = usize::from(self.len);
        let end = start + s.len();
        let slot = self.buf.get_mut(start..end).ok_or(fmt::Error)?;
        slot.copy_from_slice(s.as_bytes());
        self.len = end as u8;
        Ok(())
    }
}

impl fmt::Debug for AddrText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A path-compressed binary trie from networks to values.
#[derive(Debug, Clone)]
pub struct PrefixTrie<V> {
    nodes: Vec<Node<V>>,
}

#[derive(Debug, Clone)]
struct Node<V> {
    prefix: Addr,
    len: u8,
    value: Option<V>,
    /// Child by the bit at `len`; 0 = none (the root is never a child).
    child: [u32; 2],
}

impl<V> Default for PrefixTrie<V> {
    fn default() -> Self {
        PrefixTrie {
            nodes: vec![Node {
                prefix: 0,
                len: 0,
                value: None,
                child: [0, 0],
            }],
        }
    }
}

fn bit(a: Addr, i: u8) -> usize {
    ((a >> (127 - u32::from(i))) & 1) as usize
}

impl<V> PrefixTrie<V> {
    /// Sets the value of `net`, returning the one it replaces.
    pub fn insert(&mut self, net: IpNet, value: V) -> Option<V> {
        let (key, len) = (net.addr, net.len);
        let mut idx = 0usize;
        loop {
            if self.nodes[idx].len == len {
                return self.nodes[idx].value.replace(value);
            }
            let b = bit(key, self.nodes[idx].len);
            let c = self.nodes[idx].child[b] as usize;
            if c == 0 {
                let leaf = self.push(key, len, Some(value));
                self.nodes[idx].child[b] = leaf;
                return None;
            }
            let (cp, cl) = (self.nodes[c].prefix, self.nodes[c].len);
            let common = ((key ^ cp).leading_zeros() as u8).min(cl).min(len);
            if common == cl {
                idx = c;
                continue;
            }
            // Split the edge to `c` at the first differing bit (or at `len`).
            let mid = self.push(key, common, None);
            self.nodes[mid as usize].child[bit(cp, common)] = c as u32;
            self.nodes[idx].child[b] = mid;
            if common == len {
                self.nodes[mid as usize].value = Some(value);
            } else {
                let leaf = self.push(key, len, Some(value));
                self.nodes[mid as usize].child[bit(key, common)] = leaf;
            }
            return None;
        }
    }

    fn push(&mut self, key: Addr, len: u8, value: Option<V>) -> u32 {
        self.nodes.push(Node {
            prefix: mask(key, len),
            len,
            value,
            child: [0, 0],
        });
        (self.nodes.len() - 1) as u32
    }

    /// Calls `f` with every network containing `a`, least specific first.
    #[inline]
    pub fn for_each_match(&self, a: Addr, mut f: impl FnMut(&V)) {
        let mut idx = 0usize;
        while let Some(node) = self.nodes.get(idx) {
            if mask(a, node.len) != node.prefix {
                return;
            }
            if let Some(v) = &node.value {
                f(v);
            }
            if node.len == 128 {
                return;
            }
            idx = node.child[bit(a, node.len)] as usize;
            if idx == 0 {
                return;
            }
        }
    }

    /// Nodes allocated (at most twice the number of networks).
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn net(s: &str) -> IpNet {
        IpNet::parse(s).unwrap()
    }

    fn a(s: &str) -> Addr {
        parse_addr(s).unwrap()
    }

    #[test]
    fn parses_and_prints_canonically() {
        assert_eq!(net("10.0.0.0/8").to_string(), "10.0.0.0/8");
        assert_eq!(net("1.2.3.4").to_string(), "1.2.3.4");
        assert_eq!(net("1.2.3.4/32").to_string(), "1.2.3.4");
        assert_eq!(net("2001:DB8:0::/32").to_string(), "2001:db8::/32");
        assert_eq!(net("::/0").to_string(), "::/0");
        assert_eq!(net("0.0.0.0/0").to_string(), "0.0.0.0/0");
        assert_eq!(net("::ffff:1.2.3.4").to_string(), "1.2.3.4");
        assert!(matches!(
            IpNet::parse("10.0.0.1/8"),
            Err(NetError::HostBits(_, s)) if s == "10.0.0.0/8"
        ));
        assert!(matches!(
            IpNet::parse("10.0.0.0/33"),
            Err(NetError::BadLength(_))
        ));
        assert!(matches!(
            IpNet::parse("10.0.0.0/+8"),
            Err(NetError::BadLength(_))
        ));
        assert!(matches!(
            IpNet::parse("::/129"),
            Err(NetError::BadLength(_))
        ));
        assert!(matches!(IpNet::parse("bob"), Err(NetError::BadAddress(_))));
    }

    #[test]
    fn addresses_with_ports_and_mapped_forms() {
        assert_eq!(a("1.2.3.4:80"), a("1.2.3.4"));
        assert_eq!(a("[2001:db8::1]:443"), a("2001:db8::1"));
        assert_eq!(a("::ffff:1.2.3.4"), a("1.2.3.4"));
        assert_eq!(parse_addr("1.2.3"), None);
        assert_eq!(parse_addr("unknown"), None);
        assert_eq!(AddrText::new(a("::ffff:1.2.3.4")).as_str(), "1.2.3.4");
        assert_eq!(
            AddrText::new(a("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")).as_str(),
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
        );
        assert_eq!(
            AddrText::net(&IpNet::masked(a("1.2.3.4"), 24, 64)).as_str(),
            "1.2.3.0/24"
        );
        assert_eq!(
            AddrText::net(&IpNet::masked(a("2001:db8:1:2:3::1"), 24, 64)).as_str(),
            "2001:db8:1:2::/64"
        );
    }

    #[test]
    fn cidr_edges() {
        let n = net("192.168.0.0/16");
        assert!(n.contains(a("192.168.0.0")));
        assert!(n.contains(a("192.168.255.255")));
        assert!(!n.contains(a("192.169.0.0")));
        assert!(!n.contains(a("192.167.255.255")));
        // IPv4 networks never contain IPv6 addresses outside the mapped range.
        assert!(!net("0.0.0.0/0").contains(a("2001:db8::1")));
        assert!(net("::/0").contains(a("1.2.3.4")));
    }

    #[test]
    fn trie_finds_every_containing_network_in_order() {
        let mut t = PrefixTrie::default();
        for (i, s) in [
            "10.0.0.0/8",
            "10.1.0.0/16",
            "10.1.2.3",
            "2001:db8::/32",
            "0.0.0.0/0",
        ]
        .iter()
        .enumerate()
        {
            assert!(t.insert(net(s), i).is_none());
        }
        let matches = |s: &str| {
            let mut v = Vec::new();
            t.for_each_match(a(s), |x| v.push(*x));
            v
        };
        assert_eq!(matches("10.1.2.3"), vec![4, 0, 1, 2]);
        assert_eq!(matches("10.1.2.4"), vec![4, 0, 1]);
        assert_eq!(matches("10.2.0.0"), vec![4, 0]);
        assert_eq!(matches("11.0.0.0"), vec![4]);
        assert_eq!(matches("2001:db8:ffff::1"), vec![3]);
        assert_eq!(matches("2001:db9::1"), Vec::<usize>::new());
        assert_eq!(t.insert(net("10.0.0.0/8"), 9), Some(0));
    }

    fn arb_net() -> impl Strategy<Value = IpNet> {
        // Few distinct high bits so networks nest and share prefixes often.
        (0u8..4, any::<u128>(), 0u8..=128).prop_map(|(hi, lo, len)| {
            let a = (u128::from(hi) << 126) | (lo >> 2);
            IpNet {
                addr: mask(a, len),
                len,
            }
        })
    }

    proptest! {
        #[test]
        fn trie_agrees_with_a_scan(nets in proptest::collection::vec(arb_net(), 0..60),
                                   probes in proptest::collection::vec(any::<u128>(), 1..40)) {
            let mut t = PrefixTrie::default();
            let mut uniq: Vec<IpNet> = Vec::new();
            for n in &nets {
                t.insert(*n, *n);
                if !uniq.contains(n) { uniq.push(*n); }
            }
            prop_assert!(t.node_count() <= 2 * uniq.len() + 1);
            let mut probes = probes;
            probes.extend(nets.iter().map(|n| n.addr));
            for p in probes {
                let p = (p & !(3u128 << 126)) | (p & (3u128 << 126));
                let mut got = Vec::new();
                t.for_each_match(p, |n| got.push(*n));
                let mut want: Vec<IpNet> = uniq.iter().copied().filter(|n| n.contains(p)).collect();
                want.sort_by_key(|n| n.len);
                prop_assert_eq!(got, want);
            }
        }
    }
}
