//! Netlink messages as bytes (the layout of `linux/netlink.h`): a header, a fixed payload,
//! and attributes (4-byte aligned, nested ones flagged `NLA_F_NESTED`). The XFRM and
//! kernel-WireGuard messages are built with it, so their tests can check every byte.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_ACK: u16 = 0x4;
pub const NLM_F_EXCL: u16 = 0x200;
pub const NLM_F_CREATE: u16 = 0x400;
pub const NLM_F_DUMP: u16 = 0x300;
pub const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;
pub const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;

/// A message under construction.
#[derive(Clone, Debug)]
pub struct Message {
    bytes: Vec<u8>,
    nests: Vec<usize>,
}

fn align4(n: usize) -> usize {
    n.div_ceil(4) * 4
}

impl Message {
    /// `nlmsghdr` (length filled by [`Message::finish`]) followed by `payload`.
    pub fn new(kind: u16, flags: u16, seq: u32, payload: &[u8]) -> Self {
        let mut bytes = Vec::with_capacity(256);
        bytes.extend_from_slice(&0u32.to_ne_bytes());
        bytes.extend_from_slice(&kind.to_ne_bytes());
        bytes.extend_from_slice(&flags.to_ne_bytes());
        bytes.extend_from_slice(&seq.to_ne_bytes());
        bytes.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
        bytes.extend_from_slice(payload);
        bytes.resize(align4(bytes.len()), 0);
        Self {
            bytes,
            nests: Vec::new(),
        }
    }

    /// One attribute (`nla_len` counts the header and the value, not the padding).
    pub fn attr(&mut self, kind: u16, value: &[u8]) -> &mut Self {
        self.bytes
            .extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
        self.bytes.extend_from_slice(&kind.to_ne_bytes());
        self.bytes.extend_from_slice(value);
        self.bytes.resize(align4(self.bytes.len()), 0);
        self
    }

    pub fn u8(&mut self, kind: u16, v: u8) -> &mut Self {
        self.attr(kind, &[v])
    }

    pub fn u16(&mut self, kind: u16, v: u16) -> &mut Self {
        self.attr(kind, &v.to_ne_bytes())
    }

    pub fn u32(&mut self, kind: u16, v: u32) -> &mut Self {
        self.attr(kind, &v.to_ne_bytes())
    }

    /// A NUL-terminated string.
    pub fn string(&mut self, kind: u16, v: &str) -> &mut Self {
        let mut value = v.as_bytes().to_vec();
        value.push(0);
        self.attr(kind, &value)
    }

    /// Opens a nested attribute, closed by [`Message::end_nest`].
    pub fn nest(&mut self, kind: u16) -> &mut Self {
        self.nests.push(self.bytes.len());
        self.bytes.extend_from_slice(&0u16.to_ne_bytes());
        self.bytes
            .extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        self
    }

    pub fn end_nest(&mut self) -> &mut Self {
        if let Some(start) = self.nests.pop() {
            let len = (self.bytes.len() - start) as u16;
            self.bytes[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        }
        self
    }

    /// The bytes, with `nlmsg_len` set.
    pub fn finish(mut self) -> Vec<u8> {
        while !self.nests.is_empty() {
            self.end_nest();
        }
        let len = self.bytes.len() as u32;
        self.bytes[0..4].copy_from_slice(&len.to_ne_bytes());
        self.bytes
    }
}

/// The kernel's answer to a request: 0 or a negative errno (`struct nlmsgerr`).
pub fn ack(reply: &[u8]) -> Result<i32, String> {
    if reply.len() < 20 {
        return Err(format!("short netlink reply ({} bytes)", reply.len()));
    }
    let kind = u16::from_ne_bytes([reply[4], reply[5]]);
    if kind != NLMSG_ERROR {
        return Err(format!("unexpected netlink reply type {kind}"));
    }
    Ok(i32::from_ne_bytes([
        reply[16], reply[17], reply[18], reply[19],
    ]))
}

/// The type of the message starting `m`.
pub fn kind(m: &[u8]) -> u16 {
    m.get(4..6).map_or(0, |b| u16::from_ne_bytes([b[0], b[1]]))
}

/// An `NLMSG_ERROR` message as a result: its errno, or `Ok` for an ack.
pub fn check(m: &[u8]) -> std::io::Result<()> {
    match ack(m).map_err(std::io::Error::other)? {
        0 => Ok(()),
        errno => Err(std::io::Error::from_raw_os_error(-errno)),
    }
}

/// The attributes in `b`: (type without the nested and byte-order flags, value).
pub fn attributes(b: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 4 <= b.len() {
        let len = usize::from(u16::from_ne_bytes([b[at], b[at + 1]]));
        if len < 4 || at + len > b.len() {
            break;
        }
        let kind = u16::from_ne_bytes([b[at + 2], b[at + 3]]) & NLA_TYPE_MASK;
        out.push((kind, &b[at + 4..at + len]));
        at += align4(len);
    }
    out
}

/// A netlink socket of one protocol (`NETLINK_XFRM`, `NETLINK_GENERIC`) in the network
/// namespace of the thread that opens it.
pub struct Socket(OwnedFd);

impl Socket {
    pub fn open(protocol: i32) -> std::io::Result<Self> {
        // SAFETY: a plain socket call; the descriptor is owned right away.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                protocol,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor nobody else owns.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn send(&self, msg: &[u8]) -> std::io::Result<()> {
        // SAFETY: sends our buffer on our socket (the kernel is the default destination).
        let sent = unsafe { libc::send(self.0.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if sent < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    fn receive(&self, buffer: &mut [u8]) -> std::io::Result<usize> {
        // SAFETY: receives into our buffer.
        let n = unsafe {
            libc::recv(
                self.0.as_raw_fd(),
                buffer.as_mut_ptr().cast(),
                buffer.len(),
                0,
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Sends `msg` and reads every message of the answer: a dump's up to `NLMSG_DONE`, a
    /// request's up to its ack or error.
    pub fn messages(&self, msg: &[u8]) -> std::io::Result<Vec<Vec<u8>>> {
        self.send(msg)?;
        let mut out = Vec::new();
        let mut buffer = vec![0u8; 65536];
        loop {
            let n = self.receive(&mut buffer)?;
            let mut at = 0;
            while at + 16 <= n {
                let len = u32::from_ne_bytes([
                    buffer[at],
                    buffer[at + 1],
                    buffer[at + 2],
                    buffer[at + 3],
                ]) as usize;
                if len < 16 || at + len > n {
                    break;
                }
                let m = buffer[at..at + len].to_vec();
                let last = matches!(kind(&m), NLMSG_DONE | NLMSG_ERROR);
                out.push(m);
                if last {
                    return Ok(out);
                }
                at += align4(len);
            }
        }
    }

    /// Sends `msg` (which asks for an ack) and reads the ack: `Ok` or the kernel's error.
    pub fn request(&self, msg: &[u8]) -> std::io::Result<()> {
        let answer = self.messages(msg)?;
        answer.last().map_or(Ok(()), |m| check(m))
    }
}

/// Reading native-endian fields of a message in tests.
#[cfg(test)]
pub(crate) mod test_bytes {
    pub fn u16_at(b: &[u8], at: usize) -> u16 {
        u16::from_ne_bytes([b[at], b[at + 1]])
    }

    pub fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_ne_bytes(b[at..at + 4].try_into().unwrap())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_aligned_and_nests_measured() {
        let mut m = Message::new(0x10, NLM_F_REQUEST, 7, &[1, 2, 3]);
        m.u8(1, 9).nest(2).u32(3, 5).end_nest();
        let b = m.finish();
        // header 16 + payload 3 padded to 4 + u8 attr (5 → 8) + nest (4 + 8).
        assert_eq!(b.len(), 16 + 4 + 8 + 12);
        assert_eq!(u32::from_ne_bytes(b[0..4].try_into().unwrap()), 40);
        assert_eq!(u32::from_ne_bytes(b[8..12].try_into().unwrap()), 7, "seq");
        assert_eq!(&b[16..20], &[1, 2, 3, 0]);
        assert_eq!(
            u16::from_ne_bytes([b[20], b[21]]),
            5,
            "nla_len without padding"
        );
        assert_eq!(&b[24..28], &[9, 0, 0, 0][..4]);
        assert_eq!(u16::from_ne_bytes([b[28], b[29]]), 12, "nest length");
        assert_eq!(u16::from_ne_bytes([b[30], b[31]]), 2 | NLA_F_NESTED);
        assert_eq!(u32::from_ne_bytes(b[36..40].try_into().unwrap()), 5);
    }

    #[test]
    fn acks_and_errors_are_read_from_nlmsgerr() {
        let mut reply = vec![0u8; 36];
        reply[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        reply[16..20].copy_from_slice(&(-93i32).to_ne_bytes());
        assert_eq!(ack(&reply), Ok(-93));
        assert!(ack(&reply[..10]).is_err());
    }
}
