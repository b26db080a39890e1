//! What a node that takes over says on the network so that bridges and switches send the
//! guest's traffic to its new port at once: a gratuitous ARP for each IPv4 address the guest
//! used, and a RARP as QEMU announces a migrated guest, over a few rounds.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

/// At most this many addresses are remembered (a guest with more is unusual; the rest are
/// learnt again from its traffic).
const MAX_ADDRESSES: usize = 16;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_RARP: u16 = 0x8035;
/// The shortest Ethernet frame without FCS: shorter ones are padded to it.
const MIN_FRAME: usize = 60;

/// An IPv4 address.
pub type Ipv4 = [u8; 4];

/// The IPv4 addresses the guest has sent from, learnt from its outgoing frames; clones share
/// the set.
#[derive(Clone, Default)]
pub struct GuestAddresses(Arc<Mutex<BTreeSet<Ipv4>>>);

impl GuestAddresses {
    /// Remembers the sender address of an outgoing IPv4 packet or ARP message.
    pub fn learn(&self, frame: &[u8]) {
        let Some(ip) = sender_ipv4(frame) else {
            return;
        };
        let mut set = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if set.len() < MAX_ADDRESSES && ip != [0; 4] {
            set.insert(ip);
        }
    }

    /// The addresses learnt so far, in order.
    pub fn list(&self) -> Vec<Ipv4> {
        let set = self.0.lock().unwrap_or_else(|e| e.into_inner());
        set.iter().copied().collect()
    }
}

fn sender_ipv4(frame: &[u8]) -> Option<Ipv4> {
    let ethertype = u16::from_be_bytes(frame.get(12..14)?.try_into().ok()?);
    let at = match ethertype {
        // IPv4 header: source address at byte 12.
        ETH_P_IP => 14 + 12,
        // ARP for IPv4 over Ethernet: sender protocol address after the sender MAC.
        ETH_P_ARP => 14 + 14,
        _ => return None,
    };
    frame.get(at..at + 4)?.try_into().ok()
}

/// The frames of one announcement round for a guest with `mac` that used `addresses`: a
/// gratuitous ARP request per address, then one RARP.
pub fn announcements(mac: [u8; 6], addresses: &[Ipv4]) -> Vec<Vec<u8>> {
    let mut frames: Vec<Vec<u8>> = addresses
        .iter()
        .map(|ip| arp_frame(ETH_P_ARP, 1, mac, *ip, [0; 6], *ip))
        .collect();
    // RARP "request reverse" (op 3) naming the guest's MAC, as QEMU's self-announce does.
    frames.push(arp_frame(ETH_P_RARP, 3, mac, [0; 4], mac, [0; 4]));
    frames
}

fn arp_frame(
    ethertype: u16,
    op: u16,
    sender_mac: [u8; 6],
    sender_ip: Ipv4,
    target_mac: [u8; 6],
    target_ip: Ipv4,
) -> Vec<u8> {
    let mut f = Vec::with_capacity(MIN_FRAME);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&sender_mac);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
    f.extend_from_slice(&ETH_P_IP.to_be_bytes()); // protocol: IPv4
    f.extend_from_slice(&[6, 4]);
    f.extend_from_slice(&op.to_be_bytes());
    f.extend_from_slice(&sender_mac);
    f.extend_from_slice(&sender_ip);
    f.extend_from_slice(&target_mac);
    f.extend_from_slice(&target_ip);
    f.resize(MIN_FRAME, 0);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

    #[test]
    fn addresses_are_learnt_from_ipv4_and_arp_senders() {
        let learnt = GuestAddresses::default();
        let mut ip = vec![0u8; 34];
        ip[12..14].copy_from_slice(&ETH_P_IP.to_be_bytes());
        ip[26..30].copy_from_slice(&[10, 0, 0, 2]);
        learnt.learn(&ip);
        let arp = announcements(MAC, &[[10, 0, 0, 3]]).remove(0);
        learnt.learn(&arp);
        learnt.learn(&[0u8; 10]); // too short: ignored
        let mut ipv6 = ip.clone();
        ipv6[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
        ipv6[26..30].copy_from_slice(&[9, 9, 9, 9]);
        learnt.learn(&ipv6);
        assert_eq!(learnt.list(), vec![[10, 0, 0, 2], [10, 0, 0, 3]]);
    }

    #[test]
    fn a_round_is_a_garp_per_address_then_a_rarp() {
        let frames = announcements(MAC, &[[10, 0, 0, 2]]);
        assert_eq!(frames.len(), 2);
        let garp = &frames[0];
        assert_eq!(garp.len(), MIN_FRAME);
        assert_eq!(&garp[..6], &[0xff; 6], "broadcast");
        assert_eq!(&garp[6..12], &MAC);
        assert_eq!(&garp[12..14], &[0x08, 0x06]);
        assert_eq!(&garp[20..22], &[0, 1], "request");
        assert_eq!(&garp[28..32], &[10, 0, 0, 2], "sender IP");
        assert_eq!(&garp[38..42], &[10, 0, 0, 2], "target IP = sender IP");
        let rarp = &frames[1];
        assert_eq!(&rarp[12..14], &[0x80, 0x35]);
        assert_eq!(&rarp[20..22], &[0, 3], "reverse request");
        assert_eq!(&rarp[32..38], &MAC, "target MAC");
    }
}
