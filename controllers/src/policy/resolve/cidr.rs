//! CIDRs: parsing (host bits cleared) and `cidr` minus its `except` prefixes.

use super::{INVALID_CIDR, Invalid};
use ipnet::IpNet;

/// `cidr` minus every prefix of `except`, as disjoint prefixes.
pub(super) fn cidr_minus(cidr: &str, except: &[String]) -> Result<Vec<IpNet>, Invalid> {
    let net = parse_cidr(cidr)?;
    let mut excepts = Vec::with_capacity(except.len());
    for e in except {
        let e = parse_cidr(e)?;
        if !net.contains(&e) {
            return Err(Invalid::new(
                INVALID_CIDR,
                format!("except {e} does not lie inside cidr {net}"),
            ));
        }
        excepts.push(e);
    }
    let mut out = Vec::new();
    subtract(net, &excepts, &mut out);
    Ok(out)
}

pub(super) fn subtract(net: IpNet, excepts: &[IpNet], out: &mut Vec<IpNet>) {
    if excepts.iter().any(|e| e.contains(&net)) {
        return;
    }
    if !excepts.iter().any(|e| net.contains(e)) {
        out.push(net);
        return;
    }
    // Some except lies strictly inside: look at both halves.
    for half in net
        .subnets(net.prefix_len() + 1)
        .expect("a prefix strictly containing another can be split")
    {
        subtract(half, excepts, out);
    }
}

/// A CIDR such as `10.0.0.0/8` (host bits are cleared, as the kernel would).
pub(super) fn parse_cidr(s: &str) -> Result<IpNet, Invalid> {
    s.trim().parse::<IpNet>().map(|n| n.trunc()).map_err(|_| {
        Invalid::new(
            INVALID_CIDR,
            format!("{s:?} is not a CIDR such as 10.0.0.0/8"),
        )
    })
}
