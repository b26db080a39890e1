//! Which held frames may leave before their epoch commits: the guest's pure TCP
//! acknowledgements of input that the standby already holds.
//!
//! Output commit holds every frame until its checkpoint is acknowledged, so a stream into the
//! guest moved one window per checkpoint round trip. A pure acknowledgement (no payload, no
//! SYN, FIN, RST or URG) says only "I have these bytes" and "this much room": once the standby
//! holds every frame the guest had received when it sent it (the frame's [`Frame::input`]),
//! a guest resumed on the standby receives those frames again and has the same bytes, so the
//! acknowledgement stays true whichever node runs the guest. It may then leave at once, as
//! speculative acknowledgement does (Gerofi and Ishikawa, VEE 2012).
//!
//! It may pass held data of its own connection: its sequence number is then ahead of what the
//! peer has received, which TCP accepts for a segment without data (RFC 9293 3.10.7.4: the
//! acknowledgement is processed, the empty segment dropped), and the window-update rule
//! (SND.WL1/WL2) makes the peer ignore the older window of the data that follows. Its
//! acknowledgement number covers only the peer's bytes, never the guest's unreleased ones. A
//! guest resumed from an earlier checkpoint sends with smaller sequence numbers, which the
//! peer has not acknowledged: nothing it was told becomes false. Pure acknowledgements leave
//! in their order (each one's input count is at least the one's before). Frames that are not
//! TCP over IPv4 (ARP, IPv6, VLAN-tagged) wait for their epoch as before.

use crate::Frame;

const ETHERTYPE_IPV4: u16 = 0x0800;
const IPPROTO_TCP: u8 = 6;
const ETH_HEADER: usize = 14;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
const TCP_URG: u8 = 0x20;

/// A TCP connection as the guest's frames name it: source address and port, destination
/// address and port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Flow([u8; 12]);

/// What a frame is to the early release.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Not TCP over IPv4 (or not parsable as such).
    Other,
    /// A TCP segment of `flow`; `pure_ack` when it carries nothing but an acknowledgement.
    Tcp { flow: Flow, pure_ack: bool },
}

/// Classifies an Ethernet frame.
pub fn kind(frame: &[u8]) -> Kind {
    parse(frame).unwrap_or(Kind::Other)
}

fn parse(frame: &[u8]) -> Option<Kind> {
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    if ethertype != ETHERTYPE_IPV4 {
        return None;
    }
    let ip = frame.get(ETH_HEADER..)?;
    let ihl = usize::from(ip.first()? & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
    // Fragments (more-fragments flag or an offset) never count as pure acknowledgements.
    let fragment = u16::from_be_bytes([*ip.get(6)?, *ip.get(7)?]) & 0x3fff != 0;
    if *ip.get(9)? != IPPROTO_TCP || ihl < 20 || total < ihl {
        return None;
    }
    let tcp = ip.get(ihl..total)?;
    let offset = usize::from(tcp.get(12)? >> 4) * 4;
    let flags = *tcp.get(13)?;
    if offset < 20 || tcp.len() < offset {
        return None;
    }
    let mut flow = [0u8; 12];
    flow[..4].copy_from_slice(ip.get(12..16)?);
    flow[4..6].copy_from_slice(tcp.get(..2)?);
    flow[6..10].copy_from_slice(ip.get(16..20)?);
    flow[10..].copy_from_slice(tcp.get(2..4)?);
    let pure_ack = !fragment
        && tcp.len() == offset
        && flags & TCP_ACK != 0
        && flags & (TCP_FIN | TCP_SYN | TCP_RST | TCP_URG) == 0;
    Some(Kind::Tcp {
        flow: Flow(flow),
        pure_ack,
    })
}

/// Picks, for [`crate::Gate::release_early`], the pure acknowledgements whose input the
/// standby holds (every frame before the `through`-th).
#[derive(Clone, Copy, Debug)]
pub struct EarlyAcks {
    through: u64,
}

impl EarlyAcks {
    pub fn new(through: u64) -> Self {
        Self { through }
    }

    /// Whether `frame` may leave now.
    pub fn pick(&self, frame: &Frame) -> bool {
        frame.input <= self.through
            && matches!(kind(&frame.bytes), Kind::Tcp { pure_ack: true, .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::Frames;
    use crate::{Gate, Mode};

    /// An Ethernet + IPv4 + TCP frame from 10.0.0.2:`sport` to 10.0.0.1:5000 with `flags`
    /// and `payload` bytes of data.
    fn segment(sport: u16, flags: u8, payload: usize) -> Vec<u8> {
        let mut f = vec![0u8; ETH_HEADER + 20 + 20 + payload];
        f[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        let ip = &mut f[ETH_HEADER..];
        ip[0] = 0x45;
        let total = u16::try_from(40 + payload).unwrap();
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        ip[9] = IPPROTO_TCP;
        ip[12..16].copy_from_slice(&[10, 0, 0, 2]);
        ip[16..20].copy_from_slice(&[10, 0, 0, 1]);
        let tcp = &mut ip[20..];
        tcp[..2].copy_from_slice(&sport.to_be_bytes());
        tcp[2..4].copy_from_slice(&5000u16.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[13] = flags;
        f
    }

    fn frame(bytes: Vec<u8>, input: u64) -> Frame {
        Frame { bytes, input }
    }

    #[test]
    fn only_bare_acknowledgements_are_pure() {
        let pure = |f: &[u8]| matches!(kind(f), Kind::Tcp { pure_ack: true, .. });
        assert!(pure(&segment(1, TCP_ACK, 0)));
        assert!(pure(&segment(1, TCP_ACK | 0x08, 0)), "PSH without data");
        assert!(!pure(&segment(1, TCP_ACK, 1)), "data");
        for flag in [TCP_FIN, TCP_SYN, TCP_RST, TCP_URG] {
            assert!(!pure(&segment(1, TCP_ACK | flag, 0)), "flag {flag:#x}");
        }
        assert!(!pure(&segment(1, 0, 0)), "no ACK bit");
        let mut fragment = segment(1, TCP_ACK, 0);
        fragment[ETH_HEADER + 6] = 0x20;
        assert!(!pure(&fragment));
        let mut arp = segment(1, TCP_ACK, 0);
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        assert_eq!(kind(&arp), Kind::Other);
        assert_eq!(kind(&arp[..30]), Kind::Other, "truncated");
        assert_eq!(
            kind(&segment(1, TCP_ACK, 0)[..40]),
            Kind::Other,
            "truncated"
        );
    }

    #[test]
    fn an_acknowledgement_of_input_already_held_leaves_as_it_comes() {
        let sent = Frames::default();
        let gate = Gate::new(Box::new(sent.clone()), 0, Mode::Held);
        let (ack, data, late_ack) = (
            segment(1, TCP_ACK, 0),
            segment(1, TCP_ACK, 100),
            segment(1, TCP_ACK, 0),
        );
        // The standby holds frames before the 5th before the guest acknowledges them: no
        // later InputAck would release the acknowledgement before its epoch ends.
        assert!(!gate.release_early(move |f| EarlyAcks::new(5).pick(f)));
        gate.push(frame(ack.clone(), 5));
        gate.push(frame(data, 5));
        gate.push(frame(late_ack.clone(), 6));
        assert_eq!(
            *sent.0.lock().unwrap(),
            vec![ack.clone()],
            "data and the ack of input not held wait"
        );
        gate.release_early(move |f| EarlyAcks::new(6).pick(f));
        assert_eq!(*sent.0.lock().unwrap(), vec![ack.clone(), late_ack.clone()]);
        // A standby that returns holds none of its predecessor's input: the rule is forgotten.
        gate.open();
        gate.hold();
        sent.0.lock().unwrap().clear();
        gate.push(frame(segment(1, TCP_ACK, 0), 6));
        assert!(sent.0.lock().unwrap().is_empty());
        // Nor does an acknowledgement pass while a swap holds output back.
        gate.release_early(move |f| EarlyAcks::new(9).pick(f));
        gate.hold_back(true);
        gate.push(frame(segment(1, TCP_ACK, 0), 7));
        assert_eq!(sent.0.lock().unwrap().len(), 1, "only the one held before");
    }

    #[test]
    fn acknowledgements_of_held_input_leave_early_and_in_order() {
        let sent = Frames::default();
        let gate = Gate::new(Box::new(sent.clone()), 0, Mode::Held);
        let (ack_a, data_b, ack_b, late_ack_a) = (
            segment(1, TCP_ACK, 0),
            segment(2, TCP_ACK, 100),
            segment(2, TCP_ACK, 0),
            segment(1, TCP_ACK, 0),
        );
        gate.push(frame(ack_a.clone(), 3));
        gate.seal(1);
        gate.push(frame(data_b.clone(), 3));
        gate.push(frame(ack_b.clone(), 4));
        gate.push(frame(late_ack_a.clone(), 9));
        // The standby holds frames before the 5th: the acks of connections 1 and 2 leave
        // (connection 2's ahead of its held data); the last acknowledges input it does not
        // hold.
        assert!(gate.release_early(move |f| EarlyAcks::new(5).pick(f)));
        assert_eq!(*sent.0.lock().unwrap(), vec![ack_a.clone(), ack_b.clone()]);
        gate.release_early(move |f| EarlyAcks::new(10).pick(f));
        assert_eq!(
            *sent.0.lock().unwrap(),
            vec![ack_a.clone(), ack_b.clone(), late_ack_a.clone()]
        );
        assert!(
            gate.waiting_since().is_some(),
            "data still waits for its epoch"
        );
        gate.seal(2);
        gate.release_through(2);
        assert_eq!(
            *sent.0.lock().unwrap(),
            vec![ack_a, ack_b, late_ack_a, data_b]
        );
        assert_eq!(gate.held_bytes(), 0);
    }

    #[test]
    fn nothing_leaves_early_from_an_open_or_held_back_gate() {
        let sent = Frames::default();
        let gate = Gate::new(Box::new(sent.clone()), 0, Mode::Held);
        gate.push(frame(segment(1, TCP_ACK, 0), 0));
        gate.hold_back(true);
        let picker = EarlyAcks::new(1);
        assert!(!gate.release_early(move |f| picker.pick(f)));
        gate.hold_back(false);
        assert!(gate.release_early(move |f| picker.pick(f)));
        assert_eq!(
            gate.waiting_since(),
            None,
            "nothing of the epoch waits any more"
        );
        assert_eq!(gate.held_bytes(), 0);
    }
}
